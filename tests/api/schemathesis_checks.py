"""Dovecote's own schemathesis checks, loaded by ``st run`` through ``SCHEMATHESIS_HOOKS``.

``documented_errors`` stands in for schemathesis' ``not_a_server_error``:

* every 4xx/5xx body must be the error shape *its operation documents* for
  that status in ``/openapi.json`` (``tests/api/error_shapes.py``): the
  platform's ``{"error": {"code", "message"}}`` for most routes, the agent
  runtime's ``{"error": "<message>", "diagnostic": {...}}`` on ``/api/agent/*``,
  the desktop sessions reference's ``{"error": "session not found"}`` /
  ``{"error": StructuredError}`` where those routes document them — and the
  documented schema must itself be an error shape (an object with ``error``);
* no answer may be a 5xx, except the documented refusals of a suite that runs
  no VMs and has no desktop template: 503 ``vm_driver_disabled`` from the
  capsule creates and 503 ``desktop_template_unavailable`` from the desktop
  session create (see ``test_schemathesis.py``). Those must be documented
  explicitly by the operation (its own ``503`` response, not ``default``).
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

from tests.api.error_shapes import check_error, documented_error, error_code

ALLOWED_5XX = {("POST", "/v1/capsules"): {"vm_driver_disabled"},
               ("POST", "/v1/admin/capsules"): {"vm_driver_disabled"},
               ("POST", "/api/sessions"): {"desktop_template_unavailable"}}


@schemathesis.check
def documented_errors(ctx: Any, response: Any, case: Any) -> None:
    status = response.status_code
    if status < 400 or case.method.upper() == "HEAD":
        return
    doc = case.operation.schema.raw_schema
    method, path = case.method.upper(), case.operation.path
    # A method the path does not have (the unsupported_method check's 405) is answered
    # in the shape of the operation it was sent to.
    documented = method if method.lower() in doc["paths"][path] else case.operation.method.upper()
    body = check_error(doc, documented, path, status, response.content)
    if status >= 500:
        code = error_code(body)
        allowed = ALLOWED_5XX.get((method, path), set())
        if not (status == 503 and code in allowed):
            raise AssertionError(f"server error {status} {code}: {json.dumps(body)[:300]}")
        key, _ = documented_error(doc, method, path, status)
        if key != str(status):
            raise AssertionError(f"{method} {path} answers {status} {code} without documenting {status}")
