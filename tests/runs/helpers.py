"""Agent-run tests' client (one home; no test module imports another)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.accounts.helpers import signed_up_user
from tests.helpers.suite import Suite

TOOLS = ("bwrap", "Xvfb", "xdotool", "openbox", "mousepad")


class Api:
    def __init__(self, suite: Suite, key: str) -> None:
        self.url = suite.url
        self.key = key
        self.http = httpx.Client(base_url=suite.url, timeout=180, headers={"X-API-Key": key})

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return self.http.post(path, json=body)

    def events(
        self, run_id: str, timeout: float = 240, headers: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Read the run's SSE stream to its end (it ends after the final event)."""
        out: list[dict[str, Any]] = []
        with self.http.stream(
            "GET",
            f"/api/runs/{run_id}/events",
            headers=headers or {},
            timeout=httpx.Timeout(timeout, read=60),
        ) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                assert not line.startswith("event:")
                if line.startswith("data: "):
                    out.append(json.loads(line[6:]))
        return out


def api_client(suite: Suite, name: str) -> Api:
    browser, _, _ = signed_up_user(suite, name)
    response = browser.post("/v1/api-keys", {"name": f"{name}'s key"})
    assert response.status_code == 201, response.text
    return Api(suite, response.json()["key"])
