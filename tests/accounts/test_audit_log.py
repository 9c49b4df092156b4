"""`GET /v1/audit-logs` and `GET /v1/admin/audit-logs` over real HTTP against
`dovecote up`: what is recorded, order, cursor pagination, team isolation and
query validation."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.accounts.helpers import Browser, signed_up_user
from tests.helpers.suite import Suite
from tests.helpers.users import create_admin, eventually, regular_user

ENTRY_FIELDS = {"id", "actor_type", "actor_id", "actor_name", "resource_type", "resource_id",
                "action", "scope", "status", "metadata", "created_at"}


def _page(browser: Browser, path: str = "/v1/audit-logs", **params: Any) -> dict[str, Any]:
    response = browser.get(path, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_account_actions_are_listed_newest_first(api_suite: Suite) -> None:
    browser, email, password = signed_up_user(api_suite, "Audited")
    other = Browser(api_suite)
    login = other.post("/v1/auth/login", {"email": email, "password": password})
    assert login.status_code == 200
    user_id = login.json()["user_id"]
    assert browser.send("PATCH", "/v1/me", {"name": "Audited Too"}).status_code == 204
    assert other.post("/v1/auth/logout").status_code == 204
    failed = Browser(api_suite).post("/v1/auth/login", {"email": email, "password": "wrong-password"})
    assert failed.status_code == 401

    body = _page(browser)
    assert set(body) == {"entries", "next_cursor"} and body["next_cursor"] is None
    entries = body["entries"]
    for entry in entries:
        assert set(entry) == ENTRY_FIELDS
        assert entry["created_at"].endswith("Z")
    ours = [e["action"] for e in entries if e["action"] in {"activate", "login", "update", "logout"}]
    assert ours == ["logout", "update", "login", "activate"]
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    update = next(e for e in entries if e["action"] == "update")
    assert update["actor_type"] == "user" and update["actor_id"] == user_id
    assert update["resource_type"] == "user" and update["metadata"] == {"name": "Audited Too"}
    assert update["status"] == "success" and update["scope"] == "user"

    # Sign-up and the failed login belong to no team: the admin listing has them.
    root, _ = create_admin(api_suite, "Auditor")
    everything = _page(root, "/v1/admin/audit-logs", limit=200)["entries"]
    mine = [e for e in everything if e["resource_id"] == user_id]
    assert {"signup", "activate", "login", "update"} <= {e["action"] for e in mine}
    failure = next(e for e in mine if e["status"] == "failure")
    assert failure["action"] == "login" and failure["metadata"] == {"reason": "bad_password"}


def test_cursor_pages_have_no_gaps_or_duplicates_while_entries_are_added(api_suite: Suite) -> None:
    browser, _, _ = signed_up_user(api_suite, "Pager")
    for i in range(11):
        assert browser.send("PATCH", "/v1/me", {"name": f"Pager {i}"}).status_code == 204

    seen: list[dict[str, Any]] = []
    cursor: dict[str, str] | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 4}
        if cursor:
            params.update(cursor)
        body = _page(browser, **params)
        assert len(body["entries"]) <= 4
        seen.extend(body["entries"])
        pages += 1
        # Writes between pages land before the first page, never in a later one.
        browser.send("PATCH", "/v1/me", {"name": f"Meanwhile {pages}"})
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert set(cursor) == {"before", "before_id"}
        assert cursor["before_id"] == body["entries"][-1]["id"]
        assert cursor["before"] == body["entries"][-1]["created_at"]

    ids = [e["id"] for e in seen]
    assert len(ids) == len(set(ids)), "an entry was listed twice"
    assert ids == sorted(ids, reverse=True)
    assert pages >= 3
    everything = [e["id"] for e in _page(browser, limit=200)["entries"]]
    first = everything.index(ids[0])
    assert everything[first:] == ids, "an entry was skipped"
    assert first == pages  # exactly the renames made while paging are newer


def test_each_team_sees_only_its_own_entries(api_suite: Suite) -> None:
    alice, _, _ = signed_up_user(api_suite, "Alice")
    bob, _, _ = signed_up_user(api_suite, "Bob")
    assert alice.send("PATCH", "/v1/me", {"name": "Alice A"}).status_code == 204
    assert bob.send("PATCH", "/v1/me", {"name": "Bob B"}).status_code == 204
    a_entries = _page(alice, limit=200)["entries"]
    b_entries = _page(bob, limit=200)["entries"]
    alice_id = next(e["actor_id"] for e in a_entries if e["action"] == "activate")
    bob_id = next(e["actor_id"] for e in b_entries if e["action"] == "activate")
    assert alice_id != bob_id
    assert not {e["id"] for e in a_entries} & {e["id"] for e in b_entries}
    assert all(bob_id not in (e["actor_id"], e["resource_id"]) for e in a_entries)
    assert all(alice_id not in (e["actor_id"], e["resource_id"]) for e in b_entries)
    assert [e["metadata"] for e in a_entries if e["action"] == "update"] == [{"name": "Alice A"}]


def test_who_may_read_the_team_audit_log(api_suite: Suite) -> None:
    anon = httpx.Client(base_url=api_suite.url, timeout=30)
    assert anon.get("/v1/audit-logs").status_code == 401
    forged = anon.get("/v1/audit-logs", headers={"X-API-Key": "wrn_" + "1" * 48})
    assert forged.status_code == 401
    browser, _, _ = signed_up_user(api_suite, "Plain")
    key = browser.post("/v1/api-keys", {"name": "k"}).json()["key"]
    keyed = anon.get("/v1/audit-logs", headers={"X-API-Key": key})
    assert keyed.status_code == 403 and keyed.json()["error"]["code"] == "session_required"
    refused = browser.get("/v1/admin/audit-logs")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"


def test_bad_query_parameters_are_400(api_suite: Suite) -> None:
    browser, _, _ = signed_up_user(api_suite, "Query")
    for params in ({"limit": "0"}, {"limit": "201"}, {"limit": "-1"}, {"limit": "ten"},
                   {"limit": "1.5"}, {"before": "yesterday"}, {"before": "2026-13-01T00:00:00Z"},
                   {"before_id": "42"}, {"before_id": "aud_zzzzzzzzzzzzzzzz"},
                   {"before_id": "aud_0000000000000000"}, {"before_id": "x" * 200}):
        response = browser.get("/v1/audit-logs", params=params)
        assert response.status_code == 400, (params, response.text)
        error = response.json()["error"]
        assert set(error) == {"code", "message"} and error["message"]
        assert error["code"] in {"invalid_request", "invalid_cursor"}

    assert browser.send("PATCH", "/v1/me", {"name": "Query 2"}).status_code == 204
    newest = _page(browser, limit=1)
    assert len(newest["entries"]) == 1 and newest["next_cursor"] is not None
    assert _page(browser, before="2000-01-01T00:00:00Z")["entries"] == []
    assert _page(browser, before="2999-01-01T00:00:00+00:00")["entries"]
    assert _page(browser, before="2999-01-01T00:00:00")["entries"]  # no offset: UTC


def test_team_members_need_the_owner_or_admin_role(api_suite: Suite) -> None:
    owner, owner_me, _ = regular_user(api_suite, "Owner")
    member, member_me, _ = regular_user(api_suite, "Member")
    team = owner_me["team_id"]
    added = owner.post(f"/v1/teams/{team}/members", {"email": member_me["email"]})
    if added.status_code in (404, 405):
        pytest.skip("team membership is not available")
    assert added.status_code == 201, added.text
    switched = member.post("/v1/auth/switch-team", {"team_id": team})
    assert switched.status_code == 200 and switched.json()["role"] == "member"

    refused = member.get("/v1/audit-logs")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"

    promoted = owner.send("PATCH", f"/v1/teams/{team}/members/{member_me['user_id']}",
                          {"role": "admin"})
    assert promoted.status_code == 204, promoted.text
    eventually(lambda: member.get("/v1/audit-logs").status_code == 200)
    entries = _page(member, limit=200)["entries"]
    # The owner's team, as the owner sees it; nothing of the member's own team.
    assert [e["id"] for e in entries] == [e["id"] for e in _page(owner, limit=200)["entries"]]
    assert {"switch_team", "activate"} <= {e["action"] for e in entries}
