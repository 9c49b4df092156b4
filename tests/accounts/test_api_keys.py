"""API keys over real HTTP against `dovecote up`.

Every route of this plane is session-only in the reference (keys are for the
capsule routes), so whether a key works is asked the way the gateway's edge
asks: :class:`ResolveApiKey` to auth over the suite's bus.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import trio

from dovecote.bus.messages.auth import ResolveApiKey, Resolved
from dovecote.libs.errors import ServiceError, Unauthorized
from dovecote.services.client import open_cli_bus
from tests.helpers.suite import Suite
from tests.helpers.users import add, error, new_team, new_user, switch

KEY = re.compile(r"^wrn_[0-9a-f]{48}$")


def resolve_key(suite: Suite, key: str) -> Any:
    """What auth answers the edge for ``X-API-Key: key``: Resolved, or the refusal it raised."""

    async def ask() -> Any:
        async with open_cli_bus(suite.data_dir) as bus:
            try:
                return await bus.request("auth", ResolveApiKey(key=key), timeout=10)
            except ServiceError as exc:
                return exc

    return trio.run(ask)


def keys(browser: Any) -> list[dict[str, Any]]:
    response = browser.get("/v1/api-keys")
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def test_create_use_list_and_delete_a_key(api_suite: Suite) -> None:
    ana = new_user(api_suite, "Ana")
    created = ana.browser.post("/v1/api-keys", {"name": "ci runner"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"id", "team_id", "name", "key_prefix", "created_at", "last_used", "key"}
    key = body["key"]
    assert KEY.match(key)
    assert body["team_id"] == ana.home and body["name"] == "ci runner"
    assert body["key_prefix"] == key[:12] + "..." and body["last_used"] is None

    # The key authenticates as its team and creator.
    resolved = resolve_key(api_suite, key)
    assert isinstance(resolved, Resolved)
    principal = resolved.principal
    assert (principal.auth_type, principal.team_id, principal.user_id, principal.api_key_id) == (
        "api_key", ana.home, ana.user_id, body["id"])

    # Listed without the key, with its prefix and when it was last used.
    [listed] = keys(ana.browser)
    assert set(listed) == {"id", "team_id", "name", "key_prefix", "created_at", "last_used"}
    assert listed["id"] == body["id"] and listed["key_prefix"] == body["key_prefix"]
    assert listed["last_used"] and listed["last_used"].endswith("Z")
    assert key[12:] not in ana.browser.get("/v1/api-keys").text

    # This plane needs a session: the key alone is refused, even to list keys.
    with_key = httpx.Client(base_url=api_suite.url, headers={"X-API-Key": key})
    for method, path in (("GET", "/v1/api-keys"), ("POST", "/v1/api-keys"),
                         ("DELETE", f"/v1/api-keys/{body['id']}"), ("GET", "/v1/teams")):
        response = with_key.request(method, path, json={} if method == "POST" else None)
        assert error(response, 403) == "session_required", (method, path)

    # The name defaults; a long or unprintable one is refused.
    default = ana.browser.post("/v1/api-keys", {})
    assert default.status_code == 201 and default.json()["name"] == "Unnamed API Key"
    assert error(ana.browser.post("/v1/api-keys", {"name": "x" * 129}), 400) == "invalid_request"
    assert error(ana.browser.post("/v1/api-keys", {"name": "a\u0007b"}), 400) == "invalid_name"
    # NUL is refused for every text at the gateway, before any service (PostgreSQL cannot store it).
    assert error(ana.browser.post("/v1/api-keys", {"name": "a\u0000b"}), 400) == "invalid_request"
    assert error(ana.browser.post("/v1/api-keys", {"name": "k", "scope": "all"}),
                 400) == "invalid_request"
    assert len(keys(ana.browser)) == 2

    # Deleted: gone from the list and rejected at once.
    assert ana.browser.send("DELETE", f"/v1/api-keys/{body['id']}").status_code == 204
    assert [k["id"] for k in keys(ana.browser)] == [default.json()["id"]]
    refused = resolve_key(api_suite, key)
    assert isinstance(refused, Unauthorized) and refused.status == 401
    assert error(ana.browser.send("DELETE", f"/v1/api-keys/{body['id']}"), 404) == "not_found"
    anon = httpx.get(api_suite.url + "/v1/api-keys")
    assert error(anon, 401) == "unauthorized"


def test_keys_belong_to_the_active_team(api_suite: Suite) -> None:
    ana, eve = new_user(api_suite, "Ana"), new_user(api_suite, "Eve")
    home_key = ana.browser.post("/v1/api-keys", {"name": "home"}).json()
    team = new_team(ana)
    team_key = ana.browser.post("/v1/api-keys", {"name": "team"}).json()
    assert team_key["team_id"] == team
    assert [k["id"] for k in keys(ana.browser)] == [team_key["id"]]
    switch(ana, ana.home)
    assert [k["id"] for k in keys(ana.browser)] == [home_key["id"]]
    # A key of another team is not there to delete, from a session in that team.
    assert error(ana.browser.send("DELETE", f"/v1/api-keys/{team_key['id']}"), 404) == "not_found"

    # Another user sees none of them and cannot delete them.
    assert keys(eve.browser) == []
    for key in (home_key, team_key):
        assert error(eve.browser.send("DELETE", f"/v1/api-keys/{key['id']}"), 404) == "not_found"
    assert isinstance(resolve_key(api_suite, team_key["key"]), Resolved)


def test_a_departing_member_takes_no_key_along(api_suite: Suite) -> None:
    ana, bo = new_user(api_suite, "Ana"), new_user(api_suite, "Bo")
    team = new_team(ana)
    add(ana, team, bo)
    switch(bo, team)
    bo_key = bo.browser.post("/v1/api-keys", {"name": "bo's"}).json()
    ana_key = ana.browser.post("/v1/api-keys", {"name": "ana's"}).json()
    resolved = resolve_key(api_suite, bo_key["key"])
    assert isinstance(resolved, Resolved) and resolved.principal.role == "member"
    # Members see and manage the team's keys.
    assert {k["id"] for k in keys(bo.browser)} == {bo_key["id"], ana_key["id"]}

    assert ana.browser.send("DELETE", f"/v1/teams/{team}/members/{bo.user_id}").status_code == 204
    refused = resolve_key(api_suite, bo_key["key"])
    assert isinstance(refused, Unauthorized) and refused.status == 401
    assert isinstance(resolve_key(api_suite, ana_key["key"]), Resolved)
    assert [k["id"] for k in keys(ana.browser)] == [ana_key["id"]]
    # Bo's session is back home, where Bo's keys are Bo's own.
    bo_home_key = bo.browser.post("/v1/api-keys", {}).json()
    assert bo_home_key["team_id"] == bo.home

    # Deleting the team stops its keys as well.
    assert ana.browser.send("DELETE", f"/v1/teams/{team}").status_code == 204
    refused = resolve_key(api_suite, ana_key["key"])
    assert isinstance(refused, Unauthorized) and refused.status == 401
    assert isinstance(resolve_key(api_suite, bo_home_key["key"]), Resolved)
