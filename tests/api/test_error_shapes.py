"""Each route family documents the error shape it really sends, and sends it.

The agent runtime and the desktop sessions are wire-compatible with other
systems, whose clients read those systems' error bodies: ``/openapi.json``
must say so per operation (not the platform's ``Error`` for everything), and
the app's own answers on those paths (a 405, an unknown path) must keep the
family's shape too.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.accounts.helpers import Browser, signed_up_user
from tests.agents.helpers import Agent, Operator
from tests.api.error_shapes import check_error, documented_error
from tests.helpers.suite import Suite


@pytest.fixture(scope="module")
def doc(api_suite: Suite) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(api_suite.url + "/openapi.json", timeout=30).json()
    return document


@pytest.fixture(scope="module")
def browser(api_suite: Suite) -> Browser:
    return signed_up_user(api_suite, "Shapes")[0]


def _schema_name(doc: dict[str, Any], method: str, path: str, status: int) -> Any:
    _, schema = documented_error(doc, method, path, status)
    assert schema is not None
    if "anyOf" in schema:
        return sorted(s["$ref"].rsplit("/", 1)[1] for s in schema["anyOf"])
    return schema["$ref"].rsplit("/", 1)[1]


def test_the_document_names_each_family_s_error_shape(doc: dict[str, Any]) -> None:
    assert _schema_name(doc, "GET", "/api/agent/me", 401) == "DiagnosticError"
    assert _schema_name(doc, "POST", "/api/agent/spawn", 422) == "DiagnosticError"
    assert _schema_name(doc, "GET", "/v1/agent/sessions", 401) == "Error"
    assert _schema_name(doc, "GET", "/api/sessions/{id}", 404) == "ErrorMessage"
    assert _schema_name(doc, "POST", "/api/sessions/{id}/actions", 400) == ["Error", "StructuredErrorBody"]
    assert _schema_name(doc, "GET", "/api/sessions/{id}/observation", 409) == "StructuredErrorBody"
    assert _schema_name(doc, "GET", "/api/sessions/{id}/live-view/", 409) == "LiveViewUnavailable"
    assert _schema_name(doc, "POST", "/api/sessions/{id}/review/export", 409) == "ReviewUnavailable"
    assert _schema_name(doc, "GET", "/api/tasks/{id}", 404) == "ErrorMessage"
    # The documented 503s of a create, with their codes.
    for method, path, code in [("POST", "/v1/capsules", "vm_driver_disabled"),
                               ("POST", "/api/sessions", "desktop_template_unavailable")]:
        response = doc["paths"][path][method.lower()]["responses"]["503"]
        assert code in response["description"]
        assert response["content"]["application/json"]["schema"]["$ref"].endswith("/Error")


def test_agent_runtime_errors_are_diagnostics_even_from_the_app(
        api_suite: Suite, doc: dict[str, Any]) -> None:
    with httpx.Client(base_url=api_suite.url, timeout=30) as anonymous:
        missing = anonymous.get("/api/agent/me")
        assert missing.status_code == 401
        body = check_error(doc, "GET", "/api/agent/me", 401, missing.content)
        assert body["diagnostic"]["code"] == "identity_required"
        # Quart's own 405 (with Allow) and an unknown path under /api/agent/ keep the shape.
        wrong = anonymous.delete("/api/agent/me")
        assert wrong.status_code == 405 and "GET" in wrong.headers["Allow"]
        body = check_error(doc, "GET", "/api/agent/me", 405, wrong.content)
        assert body["diagnostic"]["code"] == "method_not_allowed"
        unknown = anonymous.get("/api/agent/no-such-thing")
        assert unknown.status_code == 404
        assert isinstance(unknown.json()["error"], str)
        assert unknown.json()["diagnostic"]["code"] == "not_found"
        # Outside the family, the platform's shape.
        outside = anonymous.get("/v1/no-such-thing")
        assert outside.status_code == 404 and outside.json()["error"]["code"] == "not_found"


def test_desktop_errors_are_the_reference_s(api_suite: Suite, doc: dict[str, Any],
                                            browser: Browser) -> None:
    response = browser.get("/api/sessions/desk-nonexistent")
    assert response.status_code == 404 and response.json() == {"error": "session not found"}
    check_error(doc, "GET", "/api/sessions/{id}", 404, response.content)
    response = browser.post("/api/sessions/desk-nonexistent/actions", {"kind": "warp"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_action"
    check_error(doc, "POST", "/api/sessions/{id}/actions", 400, response.content)
    response = browser.post("/api/tasks/task-nonexistent/pause")
    assert response.status_code == 404 and response.json() == {"error": "task not found"}
    check_error(doc, "POST", "/api/tasks/{id}/pause", 404, response.content)


def test_a_created_task_has_its_documented_runs(api_suite: Suite, doc: dict[str, Any]) -> None:
    operator = Operator(api_suite, "Tasks")
    workspace = operator.workspace("tasks")
    created = operator.post("/v1/agent/tasks", {"workspace_id": workspace, "title": "t"}, 201)
    assert created["runs"] == [] and created["task"]["title"] == "t"
    schema = doc["components"]["schemas"]["TaskResponse"]
    assert set(schema["required"]) <= set(created)
    agent: Agent = operator.session(workspace)
    assert agent.get("/api/agent/me").status_code == 200
