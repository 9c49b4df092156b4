"""Secrets stay secret: after the walkthrough, no clear-text secret in any log or table.

A suite of its own (on a fresh database of the session's PostgreSQL, so the
test can read every table) is walked through as a user would: sign-up,
activation, login, an API key, notification channels holding secrets (a
Slack webhook URL and a signed webhook's secret), a host created and
registered (its one-time registration token, its JWT and refresh token,
used for a heartbeat and a refresh). Then every line every service logged
(the suite's merged output, and any file under its data directory's logs)
and every text, JSON and bytea column of every table in every schema is
searched for each clear-text value: none may appear.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.accounts.helpers import Browser, outbox_token, unique_email
from tests.helpers.suite import Suite
from tests.helpers.tables import tables_holding

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def database(postgres_url: str) -> Iterator[str]:
    name = "secrets_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(postgres_url, dbname=name)
    try:
        yield url
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def suite(database: str) -> Iterator[Suite]:
    s = Suite(extra_env={"DATABASE_URL": database})
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def _walkthrough(suite: Suite) -> dict[str, str]:
    """The clear-text secrets a user and a host handled, by name."""
    found: dict[str, str] = {}
    browser = Browser(suite)
    email, password = unique_email("secret"), "pw-" + secrets.token_hex(12)
    found["password"] = password
    assert browser.post("/v1/auth/signup", {"email": email, "password": password,
                                            "name": "Sec"}).status_code == 201
    assert browser.post("/v1/auth/activate", {"token": outbox_token(suite, email)}).status_code == 200
    login = Browser(suite)
    assert login.post("/v1/auth/login", {"email": email, "password": password}).status_code == 200
    found["session id"] = login.http.cookies["wrenn_sid"]
    found["first session id"] = browser.http.cookies["wrenn_sid"]
    # A wrong password is logged as a failed login: not with the password.
    wrong = "wrong-" + secrets.token_hex(8)
    found["mistyped password"] = wrong
    assert Browser(suite).post("/v1/auth/login", {"email": email, "password": wrong}).status_code == 401

    key = login.post("/v1/api-keys", {"name": "deploy"}).json()["key"]
    found["api key"] = key
    assert httpx.get(suite.url + "/v1/capsules", headers={"X-API-Key": key}).status_code == 200

    slack_secret = "S" + secrets.token_hex(12)
    slack_url = f"https://hooks.slack.com/services/T0AAAA/B0BBBB/{slack_secret}"
    found["slack webhook secret"] = slack_secret
    created = login.post("/v1/channels", {"name": "ops", "provider": "slack",
                                          "config": {"webhook_url": slack_url},
                                          "events": ["capsule.create"]})
    assert created.status_code == 201, created.text
    hook = login.post("/v1/channels", {"name": "hook", "provider": "webhook",
                                       "config": {"url": "https://hooks.example.com/in"},
                                       "events": ["capsule.create"]})
    assert hook.status_code == 201, hook.text
    found["webhook signing secret"] = hook.json()["secret"]

    # The first account of the suite is its platform admin: it creates a host.
    host = login.post("/v1/hosts", {"type": "regular"})
    assert host.status_code == 201, host.text
    body: dict[str, Any] = host.json()
    found["host registration token"] = body["registration_token"]
    agent = httpx.Client(base_url=suite.url, timeout=30)
    registered = agent.post("/v1/hosts/register", json={
        "token": body["registration_token"], "address": "10.0.0.5:9000", "arch": "x86_64",
        "cpu_cores": 4, "memory_mb": 8192, "disk_gb": 50})
    assert registered.status_code == 201, registered.text
    creds = registered.json()
    found["host token"], found["host refresh token"] = creds["token"], creds["refresh_token"]
    host_id = creds["host"]["id"]
    assert agent.post(f"/v1/hosts/{host_id}/heartbeat",
                      headers={"X-Host-Token": creds["token"]}).status_code == 204
    refreshed = agent.post("/v1/hosts/auth/refresh", json={"refresh_token": creds["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
    found["refreshed host token"] = refreshed.json()["token"]
    found["refreshed host refresh token"] = refreshed.json()["refresh_token"]
    assert all(len(v) >= 12 for v in found.values()), found
    return found


def _log_lines(suite: Suite) -> list[str]:
    lines = list(suite.output)
    for path in Path(suite.data_dir).rglob("*.log"):
        if "postgres" in path.parts:
            continue
        lines.extend(path.read_text(errors="replace").splitlines())
    return lines


def test_no_secret_in_any_log_line_or_table(suite: Suite, database: str) -> None:
    found = _walkthrough(suite)
    lines = _log_lines(suite)
    # The search is not over nothing: every service's lines are in the output.
    for service in ("gateway", "auth", "notifier", "vmmgr"):
        assert any(f'"service":"{service}"' in line for line in lines), service
    leaks = []
    for name, value in found.items():
        logged = [line[:300] for line in lines if value in line]
        if logged:
            leaks.append(f"{name} logged: {logged[:3]}")
        stored = tables_holding(database, value)
        if stored:
            leaks.append(f"{name} stored in clear in {stored}")
    assert not leaks, "\n".join(leaks)


def test_the_search_finds_what_is_there(suite: Suite, database: str) -> None:
    """The table search is not blind: an email address is stored in clear, and found."""
    email = unique_email("visible")
    assert Browser(suite).post("/v1/auth/signup", {"email": email, "password": "pw-visible-123",
                                                   "name": "Vis"}).status_code == 201
    assert tables_holding(database, email)
