"""Desktop session tests' client and VM helpers (one home; no test module imports another)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.accounts.helpers import signed_up_user
from tests.helpers.suite import Suite

TEMPLATE_BUILD_S = 2400.0
"""The first run on a host builds the desktop image and template."""


class Api:
    def __init__(self, suite: Suite, key: str) -> None:
        self.http = httpx.Client(base_url=suite.url, timeout=180, headers={"X-API-Key": key})

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return self.http.post(path, json=body)

    def delete(self, path: str) -> httpx.Response:
        return self.http.delete(path)

    def act(self, session_id: str, action: dict[str, Any]) -> dict[str, Any]:
        response = self.post(f"/api/sessions/{session_id}/actions", action)
        assert response.status_code == 200, response.text
        receipt: dict[str, Any] = response.json()
        return receipt


def api_client(suite: Suite, name: str) -> Api:
    browser, _, _ = signed_up_user(suite, name)
    response = browser.post("/v1/api-keys", {"name": f"{name}'s key"})
    assert response.status_code == 201, response.text
    return Api(suite, response.json()["key"])


