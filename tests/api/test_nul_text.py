"""Text with a NUL character (or an integer past 64 bits) is a 400 in each route's own error shape.

PostgreSQL cannot store NUL in a text column: a ``"\\u0000"`` that reached a
service's INSERT was a 500 (``POST /v1/agent/sessions`` under schemathesis).
The gateway refuses it once, where text comes in — every JSON body at decode,
every path and query string before a view runs — so every operation is
covered, whatever service is behind it. Each answer is checked against the
error shape its operation documents (``tests/api/error_shapes.py``).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.accounts.helpers import Browser, signed_up_user
from tests.agents.helpers import Agent, Operator
from tests.api.error_shapes import check_error, error_code
from tests.helpers.suite import Suite

NUL = "a\x00b"
SKIP = {("DELETE", "/v1/me")}


@pytest.fixture(scope="module")
def doc(api_suite: Suite) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(api_suite.url + "/openapi.json", timeout=30).json()
    return document


@pytest.fixture(scope="module")
def browser(api_suite: Suite) -> Browser:
    return signed_up_user(api_suite, "Nul")[0]


@pytest.fixture(scope="module")
def agent(api_suite: Suite) -> Agent:
    operator = Operator(api_suite, "NulOps")
    return operator.session(operator.workspace("nul"), "nul-worker")


def _body_with_nul(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Every property a plausible value, every string one carrying a NUL."""
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    body: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        kind = prop.get("type")
        body[name] = {"integer": 1, "number": 1, "boolean": True, "array": [NUL],
                      "object": {NUL: NUL}}.get(kind, NUL) if kind else NUL
    return body or {"text": NUL}


def _assert_nul_refused(doc: dict[str, Any], method: str, path: str, response: httpx.Response) -> Any:
    assert response.status_code == 400, (method, path, response.status_code, response.text)
    body = check_error(doc, method, path, 400, response.content)
    assert "NUL" in response.text, (method, path, response.text)
    return body


def test_every_json_body_with_nul_text_is_a_documented_4xx(api_suite: Suite, doc: dict[str, Any],
                                                           browser: Browser, agent: Agent) -> None:
    tried = 0
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            media = op.get("requestBody", {}).get("content", {}).get("application/json")
            if not media or (method.upper(), path) in SKIP:
                continue
            concrete = re.sub(r"\{[^}]+\}", "nonexistent0", path)
            body = _body_with_nul(doc, media["schema"])
            if path.startswith("/api/agent/"):
                response = agent.http.request(method.upper(), concrete, json=body)
            else:
                response = browser.send(method.upper(), concrete, body)
            tried += 1
            assert 400 <= response.status_code < 500, (method, path, response.status_code, response.text)
            check_error(doc, method.upper(), path, response.status_code, response.content)
    assert tried >= 20, tried


def test_the_operations_that_stored_nul_now_refuse_it(doc: dict[str, Any], browser: Browser,
                                                      agent: Agent) -> None:
    workspace = browser.post("/v1/agent/workspaces", {"name": "nul-ws"}).json()["workspace"]["id"]
    for path, body in [
        ("/v1/agent/sessions", {"workspace_id": workspace, "agent_name": NUL}),
        ("/v1/agent/sessions", {"workspace_id": workspace, "agent_name": "w", "name": NUL}),
        ("/v1/agent/workspaces", {"name": NUL}),
        ("/v1/agent/tasks", {"workspace_id": workspace, "title": "t", "description": NUL}),
        ("/v1/agent/tasks", {"workspace_id": workspace, "title": "t",
                             "required_capabilities": [NUL]}),
        ("/api/tasks", {"session_id": "desk-0", "description": NUL}),
    ]:
        body = _assert_nul_refused(doc, "POST", path, browser.post(path, body))
        assert error_code(body) == "invalid_request"
    # Still usable afterwards, and nothing with a NUL was stored.
    listed = browser.get("/v1/agent/sessions", params={"workspace_id": workspace})
    assert listed.status_code == 200 and listed.json()["sessions"] == []
    # The agent runtime's own routes answer in its diagnostic shape.
    body = _assert_nul_refused(doc, "POST", "/api/agent/spawn", agent.post("/api/agent/spawn",
                                                                           {"agent_name": NUL}))
    assert body["diagnostic"]["code"] == "invalid_request" and isinstance(body["error"], str)
    # A desktop action answers the reference's StructuredError (invalid_action).
    body = _assert_nul_refused(doc, "POST", "/api/sessions/{id}/actions", browser.post(
        "/api/sessions/desk-0/actions", {"kind": "type_text", "text": NUL}))
    assert body["error"]["code"] == "invalid_action"
    # A soul sent as text.
    response = browser.send("PUT", "/v1/agent/souls/nul-worker", None, content=("x" + NUL).encode(),
                            headers={"Content-Type": "text/markdown"})
    _assert_nul_refused(doc, "PUT", "/v1/agent/souls/{agent_name}", response)


def test_nul_in_a_query_or_path_is_a_documented_400(doc: dict[str, Any], browser: Browser,
                                                    agent: Agent) -> None:
    response = browser.get("/v1/agent/sessions", params={"workspace_id": NUL})
    _assert_nul_refused(doc, "GET", "/v1/agent/sessions", response)
    response = agent.get("/api/agent/channels/c1/recv", params={"limit": "1\x00"})
    body = _assert_nul_refused(doc, "GET", "/api/agent/channels/{channel}/recv", response)
    assert body["diagnostic"]["code"] == "invalid_request"
    response = browser.get("/v1/agent/sessions/a%00b")
    _assert_nul_refused(doc, "GET", "/v1/agent/sessions/{id}", response)


def test_an_integer_past_64_bits_is_a_documented_400(doc: dict[str, Any], browser: Browser) -> None:
    # msgspec's JSON decoder takes it; the bus's MessagePack could not carry it (a 500).
    for path, body in [("/api/sessions", {"provider": "qemu", "height": -175833038380273762304}),
                       ("/v1/agent/tasks/nonexistent0/runs", {"max_attempts": 10**30})]:
        response = browser.post(path, body)
        assert response.status_code == 400, (path, response.text)
        documented = path.replace("nonexistent0", "{id}")
        assert "64 bits" in check_error(doc, "POST", documented, 400, response.content)["error"]["message"]
    # Text that merely looks like one is fine.
    response = browser.post("/v1/agent/workspaces", {"name": "1" * 40})
    assert response.status_code == 201, response.text
