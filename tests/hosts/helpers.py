"""Clients of the hosts API: admins, team owners and host agents."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.accounts.helpers import Browser, signed_up_user, unique_email
from tests.helpers.suite import Suite

PASSWORD = "admin-password-123"
SPECS = {"arch": "x86_64", "cpu_cores": 8, "memory_mb": 16384, "disk_gb": 200,
         "address": "10.0.0.5:9000"}


def create_admin(suite: Suite, name: str = "Hostadmin") -> tuple[Browser, dict[str, Any]]:
    """A new platform admin made with ``dovecote admin create``, logged in."""
    email = unique_email(name.lower())
    result = suite.cli("admin", "create", "--email", email, "--name", name, "--password", PASSWORD)
    assert result.returncode == 0, result.stderr
    browser = Browser(suite)
    login = browser.post("/v1/auth/login", {"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    assert login.json()["is_admin"] is True
    return browser, login.json()


def regular_user(suite: Suite, name: str) -> tuple[Browser, dict[str, Any]]:
    """A new non-admin account (owner of its default team), logged in."""
    browser, email, password = signed_up_user(suite, name)
    login = browser.post("/v1/auth/login", {"email": email, "password": password})
    assert login.status_code == 200, login.text
    assert login.json()["is_admin"] is False
    return browser, login.json()


def agent(suite: Suite) -> httpx.Client:
    """A host agent's HTTP client: no cookies, no session."""
    return httpx.Client(base_url=suite.url, timeout=30)


def create_host(browser: Browser, **body: Any) -> dict[str, Any]:
    response = browser.post("/v1/hosts", {"type": "regular", **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def register(suite: Suite, token: str, **specs: Any) -> httpx.Response:
    with agent(suite) as http:
        return http.post("/v1/hosts/register", json={"token": token, **SPECS, **specs})


def heartbeat(suite: Suite, host_id: str, jwt: str) -> httpx.Response:
    with agent(suite) as http:
        return http.post(f"/v1/hosts/{host_id}/heartbeat", headers={"X-Host-Token": jwt})


def refresh(suite: Suite, refresh_token: str) -> httpx.Response:
    with agent(suite) as http:
        return http.post("/v1/hosts/auth/refresh", json={"refresh_token": refresh_token})


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.2)
