"""Teams, members, roles and user search over real HTTP against `dovecote up`.

Users here sign up from their own loopback address (127.x.y.z): sign-up is
rate-limited per client IP, and every API test of the session shares one suite.
"""

from __future__ import annotations

import json
import re
import secrets

import httpx
import trio

from dovecote.bus.messages.auth_teams import TEAM_DELETED_TOPIC, TeamDeleted
from dovecote.services.client import open_cli_bus
from tests.helpers.suite import Suite
from tests.helpers.users import (
    activate,
    active_team,
    add,
    error,
    new_team,
    new_user,
    signup,
    switch,
    team_ids,
)

SLUG = re.compile(r"^[0-9a-f]{6}-[0-9a-f]{6}$")


def test_create_list_and_get_a_team(api_suite: Suite) -> None:
    ana = new_user(api_suite, "Ana")
    assert team_ids(ana) == {ana.home: "owner"}

    created = ana.browser.post("/v1/teams", {"name": "Research Lab_1"})
    assert created.status_code == 201
    team = created.json()
    assert set(team) == {"id", "name", "slug", "created_at", "role"}
    assert team["name"] == "Research Lab_1" and team["role"] == "owner"
    assert SLUG.match(team["slug"]) and team["created_at"].endswith("Z")
    assert team_ids(ana) == {ana.home: "owner", team["id"]: "owner"}

    # Team routes act on the active team only: switch first.
    assert error(ana.browser.get(f"/v1/teams/{team['id']}"), 403) == "forbidden"
    switch(ana, team["id"])
    detail = ana.browser.get(f"/v1/teams/{team['id']}")
    assert detail.status_code == 200
    body = detail.json()
    assert body["team"] == {k: team[k] for k in ("id", "name", "slug", "created_at")}
    [me] = body["members"]
    assert set(me) == {"user_id", "email", "role", "joined_at"}
    assert (me["user_id"], me["email"], me["role"]) == (ana.user_id, ana.email, "owner")
    assert ana.browser.get(f"/v1/teams/{team['id']}/members").json() == body["members"]

    # Names: trimmed, 1-128 of A-Z a-z 0-9 space _ (and - @ ').
    for bad in ("", "   ", "x" * 129, "semi;colon", "<b>"):
        assert error(ana.browser.post("/v1/teams", {"name": bad}), 400) in (
            "invalid_request", "invalid_team_name")
    assert error(ana.browser.post("/v1/teams", {"name": "ok", "extra": 1}), 400) == "invalid_request"
    assert error(ana.browser.post("/v1/teams", {}), 400) == "invalid_request"
    renamed = ana.browser.send("PATCH", f"/v1/teams/{team['id']}", {"name": "  Renamed  "})
    assert renamed.status_code == 204
    assert ana.browser.get(f"/v1/teams/{team['id']}").json()["team"]["name"] == "Renamed"

    # Session routes: an API key alone, or no credential, is refused.
    anon = httpx.get(api_suite.url + "/v1/teams")
    assert error(anon, 401) == "unauthorized"


def test_members_roles_and_owner_protections(api_suite: Suite) -> None:
    ana, bo, cy = (new_user(api_suite, n) for n in ("Ana", "Bo", "Cy"))
    team = new_team(ana)

    member = add(ana, team, bo)
    assert set(member) == {"user_id", "email", "role", "joined_at"}
    assert (member["user_id"], member["email"], member["role"]) == (bo.user_id, bo.email, "member")
    assert error(ana.browser.post(f"/v1/teams/{team}/members", {"email": bo.email.upper()}),
                 400) == "already_member"
    assert error(ana.browser.post(f"/v1/teams/{team}/members",
                                  {"email": "nobody-" + secrets.token_hex(4) + "@example.com"}),
                 404) == "user_not_found"
    assert error(ana.browser.post(f"/v1/teams/{team}/members", {"email": "not-an-email"}),
                 400) == "invalid_email"
    # An account that was never activated cannot be added either.
    _, inactive = signup(api_suite, "Idle")
    assert error(ana.browser.post(f"/v1/teams/{team}/members", {"email": inactive}),
                 404) == "user_not_found"

    assert team_ids(bo) == {bo.home: "owner", team: "member"}
    switch(bo, team)
    members = {m["user_id"]: m["role"] for m in bo.browser.get(f"/v1/teams/{team}/members").json()}
    assert members == {ana.user_id: "owner", bo.user_id: "member"}

    # A member manages nothing.
    assert error(bo.browser.post(f"/v1/teams/{team}/members", {"email": cy.email}),
                 403) == "insufficient_role"
    assert error(bo.browser.send("PATCH", f"/v1/teams/{team}", {"name": "Mine"}),
                 403) == "insufficient_role"
    assert error(bo.browser.send("PATCH", f"/v1/teams/{team}/members/{bo.user_id}",
                                 {"role": "admin"}), 403) == "insufficient_role"
    assert error(bo.browser.send("DELETE", f"/v1/teams/{team}"), 403) == "insufficient_role"

    # The owner promotes Bo; as admin Bo adds Cy and manages roles below owner.
    assert ana.browser.send("PATCH", f"/v1/teams/{team}/members/{bo.user_id}",
                            {"role": "admin"}).status_code == 204
    assert team_ids(bo)[team] == "admin"
    add(bo, team, cy)
    path_cy = f"/v1/teams/{team}/members/{cy.user_id}"
    assert bo.browser.send("PATCH", path_cy, {"role": "admin"}).status_code == 204
    assert bo.browser.send("PATCH", path_cy, {"role": "member"}).status_code == 204
    for bad_role in ("owner", "root", ""):
        assert error(bo.browser.send("PATCH", path_cy, {"role": bad_role}), 400) == "invalid_request"
    assert bo.browser.send("PATCH", f"/v1/teams/{team}", {"name": "Bo runs it"}).status_code == 204

    # Nobody changes or removes the owner; an admin cannot delete the team.
    path_ana = f"/v1/teams/{team}/members/{ana.user_id}"
    assert error(bo.browser.send("PATCH", path_ana, {"role": "member"}), 403) == "owner_immutable"
    assert error(ana.browser.send("PATCH", path_ana, {"role": "admin"}), 403) == "owner_immutable"
    assert error(bo.browser.send("DELETE", path_ana), 403) == "owner_immutable"
    assert error(bo.browser.send("DELETE", f"/v1/teams/{team}"), 403) == "insufficient_role"
    assert error(ana.browser.post(f"/v1/teams/{team}/leave"), 403) == "owner_cannot_leave"
    assert error(ana.browser.send("PATCH", f"/v1/teams/{team}/members/usr_unknown",
                                  {"role": "admin"}), 404) == "not_found"

    # Removing Cy ends Cy's access at once; Cy's session moves to Cy's own team.
    switch(cy, team)
    assert cy.browser.get(f"/v1/teams/{team}").status_code == 200
    assert bo.browser.send("DELETE", path_cy).status_code == 204
    assert error(bo.browser.send("DELETE", path_cy), 404) == "not_found"
    assert error(cy.browser.get(f"/v1/teams/{team}"), 403) == "forbidden"
    assert error(cy.browser.get(f"/v1/teams/{team}/members"), 403) == "forbidden"
    assert cy.browser.get("/v1/me").status_code == 200
    assert team_ids(cy) == {cy.home: "owner"}
    assert cy.browser.get(f"/v1/teams/{cy.home}").status_code == 200
    assert error(cy.browser.post("/v1/auth/switch-team", {"team_id": team}), 403) == "forbidden"

    # Demoted, Bo loses admin rights immediately.
    assert ana.browser.send("PATCH", f"/v1/teams/{team}/members/{bo.user_id}",
                            {"role": "member"}).status_code == 204
    assert error(bo.browser.post(f"/v1/teams/{team}/members", {"email": cy.email}),
                 403) == "insufficient_role"

    # Bo leaves: the team is gone from Bo's list and Bo's session is home again.
    assert bo.browser.post(f"/v1/teams/{team}/leave").status_code == 204
    assert team_ids(bo) == {bo.home: "owner"}
    assert active_team(bo) == bo.home
    members = {m["user_id"] for m in ana.browser.get(f"/v1/teams/{team}/members").json()}
    assert members == {ana.user_id}


def test_deleting_a_team(api_suite: Suite) -> None:
    ana, bo = new_user(api_suite, "Ana"), new_user(api_suite, "Bo")
    team = new_team(ana, "Doomed")
    add(ana, team, bo)
    switch(bo, team)

    # The default team stays (login lands there); it goes with the account.
    switch(ana, ana.home)
    assert error(ana.browser.send("DELETE", f"/v1/teams/{ana.home}"), 409) == "default_team"
    switch(ana, team)

    assert ana.browser.send("DELETE", f"/v1/teams/{team}").status_code == 204
    # Both sessions were on the team: both now land in their own default team.
    assert team_ids(ana) == {ana.home: "owner"} and active_team(ana) == ana.home
    assert team_ids(bo) == {bo.home: "owner"} and active_team(bo) == bo.home
    assert error(ana.browser.get(f"/v1/teams/{team}"), 403) == "forbidden"
    assert error(ana.browser.post("/v1/auth/switch-team", {"team_id": team}), 404) == "not_found"


async def test_deleting_a_team_publishes_team_deleted(api_suite: Suite) -> None:
    ana = await trio.to_thread.run_sync(new_user, api_suite, "Ana")
    team = await trio.to_thread.run_sync(new_team, ana, "Evented")
    with trio.fail_after(60):
        async with open_cli_bus(api_suite.data_dir) as bus, bus.subscribe(TEAM_DELETED_TOPIC) as events:
            response = await trio.to_thread.run_sync(
                lambda: ana.browser.send("DELETE", f"/v1/teams/{team}"))
            assert response.status_code == 204
            async for _topic, event in events:
                if isinstance(event, TeamDeleted) and event.team_id == team:
                    assert event.actor.user_id == ana.user_id
                    assert event.deleted_at.endswith("Z")
                    break


def test_a_user_of_one_team_reaches_nothing_of_another(api_suite: Suite) -> None:
    ana, eve = new_user(api_suite, "Ana"), new_user(api_suite, "Eve")
    team = new_team(ana)
    add(ana, team, new_user(api_suite, "Bo"))
    missing = "team_" + secrets.token_hex(8)
    for target in (team, ana.home, missing):  # a real team answers like a missing one
        base = f"/v1/teams/{target}"
        for method, path, body in (
                ("GET", base, None), ("PATCH", base, {"name": "Taken"}), ("DELETE", base, None),
                ("GET", base + "/members", None),
                ("POST", base + "/members", {"email": eve.email}),
                ("PATCH", f"{base}/members/{ana.user_id}", {"role": "member"}),
                ("DELETE", f"{base}/members/{ana.user_id}", None),
                ("POST", base + "/leave", None)):
            response = eve.browser.send(method, path, body)
            assert error(response, 403) == "forbidden", (method, path)
    assert team_ids(eve) == {eve.home: "owner"}
    # Nothing changed for Ana.
    detail = ana.browser.get(f"/v1/teams/{team}").json()
    assert detail["team"]["name"] == "Research" and len(detail["members"]) == 2


def test_user_search(api_suite: Suite) -> None:
    ana = new_user(api_suite, "Ana")
    # Eleven active accounts share one local part, on different domains.
    local = "srch-" + secrets.token_hex(4)
    signed = [signup(api_suite, "Srch", f"{local}@d{i:02d}.example.com") for i in range(11)]
    mails = [json.loads(line) for line in api_suite.cli("outbox", "--json", "--limit", "100")
             .stdout.splitlines() if line.strip()]
    tokens = {m["to"]: re.search(r"Activation token: (\S+)", m["body"]) for m in mails}
    for browser, email in signed[:-1]:
        match = tokens[email]
        assert match is not None
        activate(browser, email, match.group(1))
    _, last_email = signed[-1]  # never activated: not found

    found = ana.browser.get("/v1/users/search", params={"email": local + "@"})
    assert found.status_code == 200
    results = found.json()
    assert len(results) == 10
    assert all(set(r) == {"user_id", "email"} for r in results)
    assert last_email not in {r["email"] for r in results}
    assert [r["email"] for r in results] == sorted(r["email"] for r in results)

    exact = ana.browser.get("/v1/users/search", params={"email": ana.email.upper()})
    assert exact.json() == [{"user_id": ana.user_id, "email": ana.email}]
    # LIKE wildcards are matched literally.
    assert ana.browser.get("/v1/users/search", params={"email": "%@%"}).json() == []
    assert ana.browser.get("/v1/users/search", params={"email": "___-%@"}).json() == []

    for params in ({}, {"email": "ana"}, {"email": ""}, {"email": "@" + "x" * 300}):
        assert error(ana.browser.get("/v1/users/search", params=params), 400) == "invalid_request"
    assert error(ana.browser.get("/v1/users/search?email=a@&email=b@"), 400) == "invalid_request"
    anon = httpx.get(api_suite.url + "/v1/users/search", params={"email": "a@"})
    assert error(anon, 401) == "unauthorized"
