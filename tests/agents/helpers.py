"""Clients of the agent runtime over real HTTP: an operator (a signed-in user) and agents."""

from __future__ import annotations

from typing import Any

import httpx

from tests.accounts.helpers import Browser, signed_up_user
from tests.helpers.suite import Suite


class Operator:
    """A signed-in user creating workspaces, sessions, tasks and runs under ``/v1/agent``."""

    def __init__(self, suite: Suite, name: str = "Ops") -> None:
        self.suite = suite
        self.browser: Browser = signed_up_user(suite, name)[0]

    def post(self, path: str, body: Any = None, expect: int | None = None) -> Any:
        response = self.browser.post(path, body)
        if expect is not None:
            assert response.status_code == expect, (path, response.status_code, response.text)
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        response = self.browser.get(path, params=params)
        assert response.status_code == 200, (path, response.text)
        return response.json()

    def workspace(self, name: str = "main") -> str:
        return str(self.post("/v1/agent/workspaces", {"name": name}, 201)["workspace"]["id"])

    def session(self, workspace_id: str, agent_name: str = "worker", **extra: Any) -> Agent:
        body = self.post(
            "/v1/agent/sessions", {"workspace_id": workspace_id, "agent_name": agent_name, **extra}, 201
        )
        return Agent(self.suite, body["session"], body["token"])

    def task(self, workspace_id: str, title: str = "do it", **extra: Any) -> str:
        return str(
            self.post("/v1/agent/tasks", {"workspace_id": workspace_id, "title": title, **extra}, 201)[
                "task"
            ]["id"]
        )

    def run(self, task_id: str, **body: Any) -> dict[str, Any]:
        return dict(self.post(f"/v1/agent/tasks/{task_id}/runs", body or None, 201)["run"])

    def stop(self, session_id: str) -> dict[str, Any]:
        return dict(self.post(f"/v1/agent/sessions/{session_id}/stop", {}, 200)["session"])


class Agent:
    """An agent calling ``/api/agent/*`` with the reference's headers and its bearer token."""

    def __init__(self, suite: Suite, session: dict[str, Any], token: str) -> None:
        self.session = session
        self.id = session["id"]
        self.token = token
        self.http = httpx.Client(base_url=suite.url, timeout=60, headers=self.headers())

    def headers(self, **override: str) -> dict[str, str]:
        headers = {
            "X-AGH-Session-ID": self.session["id"],
            "X-AGH-Agent": self.session["agent_name"],
            "Authorization": f"Bearer {self.token}",
        }
        headers.update(override)
        return headers

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body, **kw)

    def claim(self, **body: Any) -> httpx.Response:
        return self.post("/api/agent/tasks/claim-next", body)

    def close(self) -> None:
        self.http.close()


DIAGNOSTIC_KEYS = {
    "id",
    "code",
    "severity",
    "category",
    "title",
    "message",
    "suggested_command",
    "data_freshness",
    "doc_url",
    "evidence",
}


def assert_no_raw_claim_token(value: Any) -> None:
    text = httpx.Response(200, json=value).text
    assert "clm_" not in text and '"claim_token"' not in text, text


def assert_diagnostic(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert set(body["diagnostic"]) >= DIAGNOSTIC_KEYS, body
    assert body["diagnostic"]["code"] == code, body
    assert body["diagnostic"]["severity"] == "error"
