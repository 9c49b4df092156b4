"""The gateway's /openapi.json documents every route it serves, bodies included.

Built in-process from :func:`create_app` (no bus traffic: routes are only
registered), so a route added with a bare ``add_url_rule`` or
``add_websocket`` and no OpenAPI operation fails here at once.
"""

from __future__ import annotations

import re
from typing import Any

from dovecote.gateway.app import create_app
from dovecote.gateway.state import GatewayConfig
from dovecote.libs.config import load_config
from tests.api.error_shapes import is_error_schema

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # added by Quart to every GET rule / answered by it


def _app_and_doc() -> tuple[Any, dict[str, Any]]:
    config = load_config(GatewayConfig, {"DOVECOTE_DATA_DIR": "/nonexistent"})
    app = create_app(config, bus=None)
    return app, app.extensions["dovecote"].api.document()


def test_every_served_route_is_documented() -> None:
    app, doc = _app_and_doc()
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        methods = {"GET"} if rule.websocket else set(rule.methods or ()) - IGNORED_METHODS
        served |= {(method.lower(), path) for method in methods}
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert len(served) > 100
    assert sorted(served - documented) == [], "served but not in /openapi.json"
    assert sorted(documented - served) == [], "documented but not served"


def test_uploads_document_their_multipart_form() -> None:
    _, doc = _app_and_doc()
    for path in ("/v1/capsules/{id}/files/write", "/v1/admin/capsules/{id}/files/write",
                 "/v1/capsules/{id}/files/stream/write"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]
        assert list(body) == ["multipart/form-data"], path
        ref = body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
        form = doc["components"]["schemas"][ref]
        assert set(form["required"]) == {"path", "file"}
        assert form["properties"]["file"]["format"] == "binary"


def test_every_operation_documents_its_errors() -> None:
    """Every operation has a ``default`` error, every 4xx it lists an error shape.

    The platform's ``Error``, except where a route family keeps another
    system's wire shape (the agent runtime's diagnostic on ``/api/agent/*``).
    (A 5xx may document another body: ``/healthz``'s 503 is its health report.)
    """
    _, doc = _app_and_doc()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                if status == "default" or 400 <= int(status) < 500:
                    schema = response["content"]["application/json"]["schema"]
                    assert is_error_schema(doc, schema), (method, path, status, schema)
            error = op["responses"]["default"]["content"]["application/json"]["schema"]
            family = "DiagnosticError" if path.startswith("/api/agent/") else "Error"
            assert error == {"$ref": f"#/components/schemas/{family}"}, (method, path)
