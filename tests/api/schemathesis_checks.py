"""Dovecote's own schemathesis checks, loaded by ``st run`` through ``SCHEMATHESIS_HOOKS``.

``documented_errors`` stands in for schemathesis' ``not_a_server_error``:
every 4xx/5xx body must be the documented ``{"error": {"code", "message"}}``
(strings, nothing else inside), and no answer may be a 5xx — except the one
documented refusal of a suite that runs no VMs: 503 ``vm_driver_disabled``
from the capsule creates (see ``test_schemathesis.py`` for why the fuzz runs
without a VM driver).
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

ALLOWED_5XX = {("POST", "/v1/capsules"): {"vm_driver_disabled"},
               ("POST", "/v1/admin/capsules"): {"vm_driver_disabled"}}


@schemathesis.check
def documented_errors(ctx: Any, response: Any, case: Any) -> None:
    status = response.status_code
    if status < 400 or case.method.upper() == "HEAD":
        return
    try:
        body = json.loads(response.content or b"")
        error = body["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(
            f"{status} without the documented error body: {response.content[:300]!r}") from None
    if not (isinstance(code, str) and code and isinstance(message, str)) or set(body) != {"error"}:
        raise AssertionError(f"{status} error body not in the documented shape: {body!r}")
    if status >= 500:
        allowed = ALLOWED_5XX.get((case.method.upper(), case.operation.path), set())
        if not (status == 503 and code in allowed):
            raise AssertionError(f"server error {status} {code}: {message}")
