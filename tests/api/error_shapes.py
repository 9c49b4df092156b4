"""Error bodies checked against the error shape each operation documents.

The gateway serves several wire-compatible systems, and each keeps its own
error shape: the platform's ``{"error": {"code", "message"}}``, the agent
runtime's ``{"error": "<message>", "diagnostic": {...}}``, the desktop
sessions' ``{"error": "session not found"}`` or ``{"error": StructuredError}``.
So a test does not assume one shape: it finds the response the operation
documents for the status (``"404"``, then ``"4XX"``, then ``"default"``) in
the gateway's own ``/openapi.json`` and validates the body against its schema.

What every error must still be: a JSON object with an ``error`` member —
and so must every documented error schema (:func:`check_error` checks the
document too, so an operation cannot pass by documenting anything at all).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

__all__ = ["check_error", "documented_error", "error_code", "is_error_schema"]


def documented_error(doc: dict[str, Any], method: str, path: str,
                     status: int) -> tuple[str, dict[str, Any] | None]:
    """The ``(status key, JSON schema)`` the operation documents for ``status`` (schema None: no body)."""
    responses = doc["paths"][path][method.lower()]["responses"]
    for key in (str(status), f"{str(status)[0]}XX", "default"):
        if key in responses:
            content = responses[key].get("content", {}).get("application/json")
            return key, content["schema"] if content else None
    raise AssertionError(f"{method} {path}: {status} is not documented")


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def is_error_schema(doc: dict[str, Any], schema: dict[str, Any]) -> bool:
    """Whether ``schema`` (each member of an ``anyOf``) is an object requiring ``error``."""
    members = schema.get("anyOf") or schema.get("oneOf")
    if members:
        return all(is_error_schema(doc, m) for m in members)
    schema = _resolve(doc, schema)
    return schema.get("type") == "object" and "error" in schema.get("required", [])


def check_error(doc: dict[str, Any], method: str, path: str, status: int, content: bytes) -> Any:
    """Assert ``content`` is the error body ``method path`` documents for ``status``; return it parsed.

    ``path`` is the operation's template (``/api/sessions/{id}``), as in the document.
    """
    key, schema = documented_error(doc, method, path, status)
    where = f"{method.upper()} {path} {status}"
    if schema is None:
        raise AssertionError(f"{where}: no error body documented (response {key!r})")
    if not is_error_schema(doc, schema):
        raise AssertionError(f"{where}: the documented response {key!r} is not an error shape: {schema}")
    try:
        body = json.loads(content or b"")
    except ValueError:
        raise AssertionError(f"{where} without a JSON error body: {content[:300]!r}") from None
    validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
    problem = jsonschema.exceptions.best_match(validator.iter_errors(body))
    if problem is not None:
        raise AssertionError(f"{where}: error body not in the documented shape ({key!r}): "
                             f"{problem.message} at {list(problem.absolute_path)}; body {body!r}")
    return body


def error_code(body: Any) -> str:
    """The machine-readable code of an error body, whatever its shape ('' when it has none)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return error["code"]
    diagnostic = body.get("diagnostic") if isinstance(body, dict) else None
    if isinstance(diagnostic, dict) and isinstance(diagnostic.get("code"), str):
        return diagnostic["code"]
    return ""
