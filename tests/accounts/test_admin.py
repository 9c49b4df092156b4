"""The admin plane over real HTTP against `dovecote up`: who may use it, users,
teams, the last-admin rule and `dovecote admin create`.

The suite is shared by the whole session, so the first account (which becomes
admin at sign-up) may belong to another test: admins here come from
``dovecote admin create``, and accounts signed up after it are never admins.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx
import pytest

from tests.accounts.helpers import Browser, unique_email
from tests.helpers.suite import Suite
from tests.helpers.users import PASSWORD, create_admin, eventually, regular_user


@pytest.fixture(scope="module")
def admin(api_suite: Suite) -> tuple[Browser, dict[str, Any]]:
    return create_admin(api_suite)


def _user(admin_browser: Browser, user_id: str) -> dict[str, Any]:
    users = admin_browser.get("/v1/admin/users")
    assert users.status_code == 200, users.text
    return next(u for u in users.json() if u["id"] == user_id)


def test_admin_routes_refuse_anyone_but_a_platform_admin(
        api_suite: Suite, admin: tuple[Browser, dict[str, Any]]) -> None:
    browser, me, _ = regular_user(api_suite, "Plain")
    user_id, team_id = me["user_id"], me["team_id"]
    routes: list[tuple[str, str, Any]] = [
        ("GET", "/v1/admin/users", None),
        ("GET", "/v1/admin/teams", None),
        ("GET", "/v1/admin/audit-logs", None),
        ("PUT", f"/v1/admin/users/{user_id}/active", {"active": False}),
        ("PUT", f"/v1/admin/users/{user_id}/admin", {"admin": True}),
        ("PUT", f"/v1/admin/teams/{team_id}/byoc", {"byoc": True}),
        ("DELETE", f"/v1/admin/teams/{team_id}", None),
    ]
    anon = httpx.Client(base_url=api_suite.url, timeout=30)
    for method, path, body in routes:
        refused = browser.send(method, path, body)
        assert refused.status_code == 403, (method, path, refused.text)
        assert set(refused.json()) == {"error"}
        assert refused.json()["error"]["code"] == "forbidden" and refused.json()["error"]["message"]
        assert anon.request(method, path, json=body).status_code == 401
        with_key = anon.request(method, path, json=body, headers={"X-API-Key": "wrn_" + "0" * 48})
        assert with_key.status_code == 401  # a key that does not exist
    # Nothing changed: still active, not admin, and the team is still there.
    assert browser.get("/v1/me").status_code == 200
    account = _user(admin[0], user_id)
    assert account["is_active"] is True and account["is_admin"] is False


def test_admin_lists_users_and_teams_and_toggles_byoc(
        api_suite: Suite, admin: tuple[Browser, dict[str, Any]]) -> None:
    root, _ = admin
    browser, me, _ = regular_user(api_suite, "Listed")
    account = _user(root, me["user_id"])
    assert account["email"] == me["email"] and account["name"] == "Listed"
    assert account["is_active"] is True and account["is_admin"] is False
    assert account["has_password"] is True and account["team_count"] == 1
    assert account["created_at"].endswith("Z")

    teams = root.get("/v1/admin/teams")
    assert teams.status_code == 200
    team = next(t for t in teams.json() if t["id"] == me["team_id"])
    assert team["byoc"] is False and team["owner_id"] == me["user_id"]
    assert team["member_count"] == 1 and team["owner_email"] == me["email"]

    assert root.send("PUT", f"/v1/admin/teams/{me['team_id']}/byoc", {"byoc": True}).status_code == 204
    team = next(t for t in root.get("/v1/admin/teams").json() if t["id"] == me["team_id"])
    assert team["byoc"] is True

    entries = root.get("/v1/admin/audit-logs", params={"limit": 20}).json()["entries"]
    toggle = next(e for e in entries if e["action"] == "set_byoc" and e["resource_id"] == me["team_id"])
    assert toggle["scope"] == "admin" and toggle["metadata"] == {"byoc": True, "previous": False}
    assert toggle["actor_id"] == admin[1]["user_id"] and toggle["status"] == "success"
    # The platform's own actions stay out of the team's listing.
    own = browser.get("/v1/audit-logs").json()["entries"]
    assert all(e["scope"] != "admin" for e in own)

    missing = root.send("PUT", "/v1/admin/teams/team_nonexistent/byoc", {"byoc": True})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = root.send("PUT", f"/v1/admin/teams/{me['team_id']}/byoc", {"byoc": "yes"})
    assert bad.status_code == 400
    assert root.send("PUT", "/v1/admin/users/usr_nonexistent/active",
                     {"active": True}).status_code == 404


def test_deactivating_a_user_ends_their_sessions_and_login(
        api_suite: Suite, admin: tuple[Browser, dict[str, Any]]) -> None:
    root, _ = admin
    browser, me, password = regular_user(api_suite, "Gone")
    assert browser.get("/v1/me").status_code == 200
    path = f"/v1/admin/users/{me['user_id']}/active"

    assert root.send("PUT", path, {"active": False}).status_code == 204
    eventually(lambda: browser.get("/v1/me").status_code == 401)
    login = Browser(api_suite).post("/v1/auth/login", {"email": me["email"], "password": password})
    assert login.status_code == 401 and login.json()["error"]["code"] == "invalid_credentials"
    assert _user(root, me["user_id"])["is_active"] is False

    assert root.send("PUT", path, {"active": True}).status_code == 204
    again = Browser(api_suite)
    assert again.post("/v1/auth/login", {"email": me["email"], "password": password}).status_code == 200
    assert again.get("/v1/me").status_code == 200

    entries = root.get("/v1/admin/audit-logs", params={"limit": 50}).json()["entries"]
    actions = [e["action"] for e in entries if e["resource_id"] == me["user_id"] and e["scope"] == "admin"]
    assert actions[:2] == ["activate", "deactivate"]


def test_admin_deletes_a_team(api_suite: Suite, admin: tuple[Browser, dict[str, Any]]) -> None:
    root, _ = admin
    browser, me, password = regular_user(api_suite, "Homeless")
    guest, guest_me, _ = regular_user(api_suite, "Guest")
    added = browser.post(f"/v1/teams/{me['team_id']}/members", {"email": guest_me["email"]})
    has_members = added.status_code == 201
    if has_members:
        assert guest.post("/v1/auth/switch-team", {"team_id": me["team_id"]}).status_code == 200

    assert root.send("DELETE", f"/v1/admin/teams/{me['team_id']}").status_code == 204
    # The owner had no other team: their session ends.
    eventually(lambda: browser.get("/v1/me").status_code == 401)
    assert all(t["id"] != me["team_id"] for t in root.get("/v1/admin/teams").json())
    again = root.send("DELETE", f"/v1/admin/teams/{me['team_id']}")
    assert again.status_code == 404
    if has_members:  # a member's session moved back to their own team
        assert guest.get("/v1/me").status_code == 200
        assert guest.get("/v1/audit-logs").status_code == 200
    # The owner can still sign in and lands in a new team of their own.
    login = Browser(api_suite).post("/v1/auth/login", {"email": me["email"], "password": password})
    assert login.status_code == 200 and login.json()["team_id"] != me["team_id"]
    entry = next(e for e in root.get("/v1/admin/audit-logs").json()["entries"]
                 if e["action"] == "delete" and e["resource_id"] == me["team_id"])
    assert entry["scope"] == "admin" and entry["resource_type"] == "team"


def test_granting_admin_takes_effect_on_the_next_request(
        api_suite: Suite, admin: tuple[Browser, dict[str, Any]]) -> None:
    root, _ = admin
    browser, me, _ = regular_user(api_suite, "Promoted")
    assert browser.get("/v1/admin/users").status_code == 403
    path = f"/v1/admin/users/{me['user_id']}/admin"
    assert root.send("PUT", path, {"admin": True}).status_code == 204
    eventually(lambda: browser.get("/v1/admin/users").status_code == 200)
    assert _user(root, me["user_id"])["is_admin"] is True
    assert root.send("PUT", path, {"admin": False}).status_code == 204
    eventually(lambda: browser.get("/v1/admin/users").status_code == 403)
    assert root.send("PUT", path, {"admin": "no"}).status_code == 400
    assert root.send("PUT", path, {}).status_code == 400


def test_the_last_active_admin_cannot_be_removed(api_suite: Suite) -> None:
    root, me = create_admin(api_suite, "Last")
    helper, other, _ = regular_user(api_suite, "Heir")
    others = [u["id"] for u in root.get("/v1/admin/users").json()
              if u["is_admin"] and u["is_active"] and u["id"] != me["user_id"]]
    try:
        for user_id in others:
            assert root.send("PUT", f"/v1/admin/users/{user_id}/admin",
                             {"admin": False}).status_code == 204
        # Alone now: neither demotion nor deactivation of the last admin.
        for path, body in ((f"/v1/admin/users/{me['user_id']}/admin", {"admin": False}),
                           (f"/v1/admin/users/{me['user_id']}/active", {"active": False})):
            refused = root.send("PUT", path, body)
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "last_admin"
        assert root.get("/v1/admin/users").status_code == 200

        # With a second admin, the first may step down; the second is then the last.
        assert root.send("PUT", f"/v1/admin/users/{other['user_id']}/admin",
                         {"admin": True}).status_code == 204
        assert root.send("PUT", f"/v1/admin/users/{me['user_id']}/admin",
                         {"admin": False}).status_code == 204
        eventually(lambda: helper.get("/v1/admin/users").status_code == 200)
        refused = helper.send("PUT", f"/v1/admin/users/{other['user_id']}/admin", {"admin": False})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "last_admin"
    finally:
        # Put the session's other admins back, whoever is admin now.
        for caller in (root, helper):
            for user_id in [me["user_id"], *others]:
                caller.send("PUT", f"/v1/admin/users/{user_id}/admin", {"admin": True})
    assert all(_user(helper, user_id)["is_admin"] for user_id in [me["user_id"], *others])


def _cli(suite: Suite, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dovecote.services.cli", "admin", "create", *args],
                          env={**suite.env, "DOVECOTE_DATA_DIR": str(suite.data_dir), **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_admin_create_cli(api_suite: Suite) -> None:
    # A new account: active, admin, with a team, password from the environment.
    email = unique_email("cli")
    made = _cli(api_suite, "--email", email, "--name", "Cli Admin",
                env={"DOVECOTE_ADMIN_PASSWORD": PASSWORD})
    assert made.returncode == 0, made.stderr
    login = Browser(api_suite).post("/v1/auth/login", {"email": email, "password": PASSWORD})
    assert login.status_code == 200 and login.json()["is_admin"] is True
    assert login.json()["role"] == "owner"

    # An existing account is promoted and keeps its password.
    browser, me, password = regular_user(api_suite, "Existing")
    promoted = _cli(api_suite, "--email", me["email"].upper(), "--name", "Ignored",
                    "--password", "a-different-password")
    assert promoted.returncode == 0, promoted.stderr
    assert "promoted" in promoted.stdout and me["user_id"] in promoted.stdout
    eventually(lambda: browser.get("/v1/admin/users").status_code == 200)
    relogin = Browser(api_suite).post("/v1/auth/login", {"email": me["email"], "password": password})
    assert relogin.status_code == 200 and relogin.json()["is_admin"] is True

    # Refusals: a weak password, a bad address, no password and no terminal.
    weak = _cli(api_suite, "--email", unique_email("weak"), "--name", "Weak", "--password", "short")
    assert weak.returncode == 1 and "weak_password" in weak.stderr
    bad = _cli(api_suite, "--email", "not-an-address", "--name", "Bad", "--password", PASSWORD)
    assert bad.returncode == 1 and "invalid_email" in bad.stderr
    silent = _cli(api_suite, "--email", unique_email("tty"), "--name", "Tty",
                  env={"DOVECOTE_ADMIN_PASSWORD": ""})
    assert silent.returncode == 2 and "DOVECOTE_ADMIN_PASSWORD" in silent.stderr
