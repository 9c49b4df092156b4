"""A client of the accounts API as a browser or a script would use it."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import httpx

from tests.helpers.suite import Suite


class Browser:
    """An httpx client that sends the CSRF header the way the SPA does."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.http = httpx.Client(base_url=suite.url, timeout=30)

    def csrf(self) -> dict[str, str]:
        token = self.http.cookies.get("wrenn_csrf")
        return {"X-CSRF-Token": token} if token else {}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, **kw)

    def send(self, method: str, path: str, body: Any = None, *, csrf: bool = True,
             **kw: Any) -> httpx.Response:
        headers = {**(self.csrf() if csrf else {}), **kw.pop("headers", {})}
        return self.http.request(method, path, json=body, headers=headers, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return self.send("POST", path, body, **kw)


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{secrets.token_hex(4)}@example.com"


def outbox_token(suite: Suite, email: str, kind: str = "Activation") -> str:
    """The newest token mailed to ``email``, read with ``dovecote outbox``."""
    result = suite.cli("outbox", "--json", "--limit", "50")
    assert result.returncode == 0, result.stderr
    mails = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    for mail in reversed(mails):
        if mail["to"] == email:
            match = re.search(rf"{kind} token: (\S+)", mail["body"])
            if match:
                return match.group(1)
    raise AssertionError(f"no {kind} mail for {email} in {mails}")


def signed_up_user(suite: Suite, name: str = "Ana") -> tuple[Browser, str, str]:
    """A new, activated, logged-in account: (browser, email, password)."""
    browser = Browser(suite)
    email, password = unique_email(name.lower()), "correct horse battery"
    response = browser.post("/v1/auth/signup", {"email": email, "password": password, "name": name})
    assert response.status_code == 201, response.text
    response = browser.post("/v1/auth/activate", {"token": outbox_token(suite, email)})
    assert response.status_code == 200, response.text
    return browser, email, password
