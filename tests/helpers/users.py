"""People of a test suite: platform admins, users, teams, API keys, and ``eventually``.

Every test module that needs an account takes it from here (not from another
test module). Users made by :func:`new_user` sign up from their own loopback
address (127.x.y.z): sign-up is rate-limited per client IP, and every API test
of the session shares one suite.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx

from tests.accounts.helpers import Browser, outbox_token, signed_up_user, unique_email
from tests.helpers.suite import Suite

PASSWORD = "admin-password-123"


def create_admin(suite: Suite, name: str = "Root") -> tuple[Browser, dict[str, Any]]:
    """A new platform admin made with the CLI and logged in: (browser, session body)."""
    email = unique_email(name.lower())
    result = suite.cli("admin", "create", "--email", email, "--name", name, "--password", PASSWORD)
    assert result.returncode == 0, result.stderr
    assert "created platform admin" in result.stdout
    browser = Browser(suite)
    login = browser.post("/v1/auth/login", {"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    assert login.json()["is_admin"] is True
    return browser, login.json()


def regular_user(suite: Suite, name: str) -> tuple[Browser, dict[str, Any], str]:
    """A new non-admin account, logged in: (browser, session body, password)."""
    browser, email, password = signed_up_user(suite, name)
    login = browser.post("/v1/auth/login", {"email": email, "password": password})
    assert login.status_code == 200, login.text
    assert login.json()["is_admin"] is False
    return browser, login.json(), password


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until ``check()`` holds (the gateway's cache is dropped by an event)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.2)


class User(NamedTuple):
    browser: Browser
    email: str
    user_id: str
    home: str  # the default team made at activation


def own_address_browser(suite: Suite) -> Browser:
    """A Browser whose requests come from a loopback address of its own."""
    browser = Browser(suite)
    browser.http.close()
    a, b, c = secrets.randbelow(254) + 1, secrets.randbelow(256), secrets.randbelow(254) + 1
    browser.http = httpx.Client(base_url=suite.url, timeout=30,
                                transport=httpx.HTTPTransport(local_address=f"127.{a}.{b}.{c}"))
    return browser


def signup(suite: Suite, name: str, email: str | None = None) -> tuple[Browser, str]:
    browser = own_address_browser(suite)
    email = email or f"{name.lower()}-{secrets.token_hex(4)}@example.com"
    response = browser.post("/v1/auth/signup",
                            {"email": email, "password": "correct horse battery", "name": name})
    assert response.status_code == 201, response.text
    return browser, email


def activate(browser: Browser, email: str, token: str) -> User:
    response = browser.post("/v1/auth/activate", {"token": token})
    assert response.status_code == 200, response.text
    body = response.json()
    return User(browser, email, body["user_id"], body["team_id"])


def new_user(suite: Suite, name: str) -> User:
    """A new, activated, signed-in user in their default team."""
    browser, email = signup(suite, name)
    return activate(browser, email, outbox_token(suite, email))


def switch(user: User, team_id: str) -> None:
    response = user.browser.post("/v1/auth/switch-team", {"team_id": team_id})
    assert response.status_code == 200, response.text
    assert response.json()["team_id"] == team_id


def new_team(user: User, name: str = "Research") -> str:
    """A team owned by ``user``, made their active team; returns its id."""
    response = user.browser.post("/v1/teams", {"name": name})
    assert response.status_code == 201, response.text
    team_id: str = response.json()["id"]
    switch(user, team_id)
    return team_id


def error(response: httpx.Response, status: int) -> str:
    """The error code of a refused request, after checking status and shape."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    code: str = body["error"]["code"]
    return code


def team_ids(user: User) -> dict[str, str]:
    response = user.browser.get("/v1/teams")
    assert response.status_code == 200, response.text
    return {t["id"]: t["role"] for t in response.json()}


def active_team(user: User) -> str:
    """The active team of the user's session, found by probing GET /v1/teams/{id}."""
    for team_id in team_ids(user):
        if user.browser.get(f"/v1/teams/{team_id}").status_code == 200:
            return team_id
    raise AssertionError("the session reaches none of the user's teams")


def add(owner: User, team_id: str, member: User) -> dict[str, Any]:
    response = owner.browser.post(f"/v1/teams/{team_id}/members", {"email": member.email})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def api_key(browser: Browser, name: str = "test key") -> str:
    """A new API key of the browser's active team."""
    response = browser.post("/v1/api-keys", {"name": name})
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key
