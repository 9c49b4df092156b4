"""Hosts over real HTTP against `dovecote up`: creation, registration, host
tokens, heartbeats, refresh rotation, tags, deletion, and who sees what.

The suite is shared with other tests, so each test makes its own admin and
users, and looks only at the hosts it created.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from dovecote.bus.messages.hosts import EnsureLocalHost, HostReply, HostSpecs
from dovecote.services import host_registration
from dovecote.services.client import open_cli_bus
from tests.accounts.helpers import Browser
from tests.helpers.suite import Suite
from tests.hosts.helpers import (
    SPECS,
    create_admin,
    create_host,
    eventually,
    heartbeat,
    refresh,
    register,
    regular_user,
)


@pytest.fixture(scope="module")
def admin(api_suite: Suite) -> tuple[Browser, dict[str, Any]]:
    return create_admin(api_suite)


def _audit_actions(admin: Browser, host_id: str) -> list[str]:
    entries = admin.get("/v1/admin/audit-logs", params={"limit": 200}).json()["entries"]
    return [e["action"] for e in reversed(entries) if e["resource_id"] == host_id]


def test_a_host_goes_from_creation_to_deletion(api_suite: Suite, admin: tuple[Browser, Any]) -> None:
    browser, _ = admin
    created = create_host(browser, provider="hetzner", availability_zone="eu-west")
    host, token = created["host"], created["registration_token"]
    assert host["status"] == "pending" and host["type"] == "regular" and host["team_id"] is None
    assert host["provider"] == "hetzner" and host["last_heartbeat_at"] is None

    # Register: specs recorded, online, a JWT and a refresh token.
    response = register(api_suite, token)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["host"]["id"] == host["id"] and body["host"]["status"] == "online"
    assert {k: body["host"][k] for k in SPECS} == SPECS
    jwt, refresh_token = body["token"], body["refresh_token"]
    assert jwt.count(".") == 2 and refresh_token

    # The registration token works once.
    again = register(api_suite, token)
    assert again.status_code == 401 and again.json()["error"]["code"] == "invalid_token"
    # A registered host gets no new registration token.
    assert browser.post(f"/v1/hosts/{host['id']}/token").status_code == 409

    # Heartbeats: with its own JWT only.
    assert heartbeat(api_suite, host["id"], jwt).status_code == 204
    assert heartbeat(api_suite, host["id"], "x.y.z").status_code == 401
    mismatch = heartbeat(api_suite, "host-0000000000000000", jwt)
    assert mismatch.status_code == 403 and mismatch.json()["error"]["code"] == "host_mismatch"
    no_token = browser.post(f"/v1/hosts/{host['id']}/heartbeat")  # a session is not a host
    assert no_token.status_code == 401
    assert browser.get(f"/v1/hosts/{host['id']}").json()["last_heartbeat_at"]

    # Refresh rotates; the new JWT works; the rotated refresh token is refused.
    rotated = refresh(api_suite, refresh_token)
    assert rotated.status_code == 200, rotated.text
    jwt2, refresh2 = rotated.json()["token"], rotated.json()["refresh_token"]
    assert refresh2 != refresh_token and rotated.json()["host"]["id"] == host["id"]
    assert heartbeat(api_suite, host["id"], jwt2).status_code == 204
    reuse = refresh(api_suite, refresh_token)
    assert reuse.status_code == 401 and reuse.json()["error"]["code"] == "invalid_token"
    # Reuse revoked the whole chain: its newest refresh token and its JWTs too.
    assert refresh(api_suite, refresh2).status_code == 401
    eventually(lambda: heartbeat(api_suite, host["id"], jwt2).status_code == 401, timeout=15)

    # Tags.
    tags = f"/v1/hosts/{host['id']}/tags"
    assert browser.post(tags, {"tag": "gpu"}).status_code == 204
    assert browser.post(tags, {"tag": "zone:eu-west"}).status_code == 204
    assert browser.post(tags, {"tag": "gpu"}).status_code == 204  # idempotent
    bad = browser.post(tags, {"tag": "no spaces!"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_tag"
    assert browser.post(tags, {"tag": ""}).status_code == 400
    assert browser.get(tags).json() == ["gpu", "zone:eu-west"]
    assert browser.send("DELETE", f"{tags}/gpu").status_code == 204
    assert browser.send("DELETE", f"{tags}/gpu").status_code == 404
    assert browser.get(tags).json() == ["zone:eu-west"]

    # Delete: preview first (no capsules), then delete.
    preview = browser.get(f"/v1/hosts/{host['id']}/delete-preview")
    assert preview.status_code == 200, preview.text
    assert preview.json()["host"]["id"] == host["id"] and preview.json()["sandbox_ids"] == []
    assert browser.send("DELETE", f"/v1/hosts/{host['id']}?force=maybe").status_code == 400
    assert browser.send("DELETE", f"/v1/hosts/{host['id']}").status_code == 204
    assert browser.get(f"/v1/hosts/{host['id']}").status_code == 404
    assert browser.send("DELETE", f"/v1/hosts/{host['id']}").status_code == 404
    assert host["id"] not in [h["id"] for h in browser.get("/v1/hosts").json()]

    # Every state change is in the (admin) audit log.
    actions = _audit_actions(browser, host["id"])
    for action in ("create", "register", "refresh_token", "refresh_token_reuse", "add_tag",
                   "remove_tag", "delete"):
        assert action in actions, actions


def test_a_new_registration_token_voids_the_previous_one(
        api_suite: Suite, admin: tuple[Browser, Any]) -> None:
    browser, _ = admin
    created = create_host(browser)
    renewed = browser.post(f"/v1/hosts/{created['host']['id']}/token")
    assert renewed.status_code == 201, renewed.text
    new_token = renewed.json()["registration_token"]
    assert new_token != created["registration_token"]
    assert register(api_suite, created["registration_token"]).status_code == 401
    assert register(api_suite, new_token).status_code == 201


def test_registration_validates_its_body(api_suite: Suite, admin: tuple[Browser, Any]) -> None:
    browser, _ = admin
    token = create_host(browser)["registration_token"]
    for bad in ({"address": "no-port"}, {"address": "10.0.0.1:99999"}, {"cpu_cores": -1},
                {"arch": "x86 64"}):
        response = register(api_suite, token, **bad)
        assert response.status_code == 400, (bad, response.text)
    assert register(api_suite, "not-a-token").status_code == 401
    assert register(api_suite, token).status_code == 201  # the refusals did not use it


def test_a_team_without_byoc_cannot_create_hosts(api_suite: Suite) -> None:
    owner, session = regular_user(api_suite, "Nobyoc")
    byoc = owner.post("/v1/hosts", {"type": "byoc", "team_id": session["team_id"]})
    assert byoc.status_code == 403 and byoc.json()["error"]["code"] == "byoc_not_enabled"
    regular = owner.post("/v1/hosts", {"type": "regular"})
    assert regular.status_code == 403
    assert owner.post("/v1/hosts", {"type": "byoc"}).status_code == 400  # team_id required
    assert owner.post("/v1/hosts", {"type": "cloud"}).status_code == 400
    assert owner.get("/v1/hosts").json() == []


def test_byoc_hosts_belong_to_their_team(api_suite: Suite, admin: tuple[Browser, Any]) -> None:
    root, _ = admin
    owner, session = regular_user(api_suite, "Byocowner")
    other, _ = regular_user(api_suite, "Otherteam")
    team_id = session["team_id"]
    assert root.send("PUT", f"/v1/admin/teams/{team_id}/byoc", {"byoc": True}).status_code == 204

    created = owner.post("/v1/hosts", {"type": "byoc", "team_id": team_id, "provider": "aws"})
    assert created.status_code == 201, created.text
    host = created.json()["host"]
    assert host["type"] == "byoc" and host["team_id"] == team_id and host["status"] == "pending"
    platform = create_host(root)["host"]

    # The team sees its host, not platform hosts; another team sees nothing.
    assert [h["id"] for h in owner.get("/v1/hosts").json()] == [host["id"]]
    assert owner.get(f"/v1/hosts/{platform['id']}").status_code == 404
    assert other.get("/v1/hosts").json() == []
    for path in ("", "/tags", "/delete-preview"):
        assert other.get(f"/v1/hosts/{host['id']}{path}").status_code == 404
    assert other.send("DELETE", f"/v1/hosts/{host['id']}").status_code == 404
    assert other.post(f"/v1/hosts/{host['id']}/tags", {"tag": "mine"}).status_code == 404
    # Nor can it create hosts for a team it is not in.
    assert other.post("/v1/hosts", {"type": "byoc", "team_id": team_id}).status_code == 403
    # Admins see everything.
    listed = {h["id"] for h in root.get("/v1/hosts").json()}
    assert {host["id"], platform["id"]} <= listed

    # An API key is not a session.
    key = owner.post("/v1/api-keys", {"name": "k"}).json()["key"]
    with_key = Browser(api_suite).get("/v1/hosts", headers={"X-API-Key": key})
    assert with_key.status_code == 403

    # The owner manages the host through its life.
    token = owner.post(f"/v1/hosts/{host['id']}/token").json()["registration_token"]
    registered = register(api_suite, token)
    assert registered.status_code == 201
    assert heartbeat(api_suite, host["id"], registered.json()["token"]).status_code == 204
    assert owner.post(f"/v1/hosts/{host['id']}/tags", {"tag": "byoc"}).status_code == 204
    assert owner.send("DELETE", f"/v1/hosts/{host['id']}?force=true").status_code == 204
    assert owner.get("/v1/hosts").json() == []
    # The team's audit log has the host's entries.
    team_log = owner.get("/v1/audit-logs", params={"limit": 200}).json()["entries"]
    assert {"create", "register", "add_tag", "delete"} <= {
        e["action"] for e in team_log if e["resource_id"] == host["id"]}


def test_the_cli_registration_stores_credentials_and_heartbeats(
        api_suite: Suite, admin: tuple[Browser, Any], tmp_path: Path) -> None:
    browser, _ = admin
    token = create_host(browser)["registration_token"]
    creds = host_registration.register_host(api_suite.url, token, tmp_path)
    path = tmp_path / "host.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert host_registration.load_credentials(tmp_path) == creds
    host_registration.send_heartbeat(tmp_path)
    host = browser.get(f"/v1/hosts/{creds['host_id']}").json()
    assert host["status"] == "online" and host["memory_mb"] and host["cpu_cores"]
    assert host["address"].endswith(":0")
    # Near expiry, the stored token is refreshed (and the refresh token rotated).
    refreshed = host_registration.fresh_credentials(tmp_path, margin_s=10 * 86400)
    assert refreshed["token"] != creds["token"]
    assert refreshed["refresh_token"] != creds["refresh_token"]
    host_registration.send_heartbeat(tmp_path)
    with pytest.raises(host_registration.RegistrationError):
        host_registration.register_host(api_suite.url, token, tmp_path / "again")


async def test_ensure_local_host_creates_an_online_platform_host(api_suite: Suite) -> None:
    host_id = "local-test-" + os.urandom(4).hex()
    with trio.fail_after(30):
        async with open_cli_bus(api_suite.data_dir) as bus:
            first = await bus.request("auth", EnsureLocalHost(
                host_id=host_id, specs=HostSpecs(arch="x86_64", cpu_cores=4)), timeout=10)
            assert isinstance(first, HostReply)
            assert first.body.status == "online" and first.body.type == "regular"
            assert first.body.cpu_cores == 4 and first.body.created_by == "system"
            again = await bus.request("auth", EnsureLocalHost(
                host_id=host_id, specs=HostSpecs(memory_mb=2048)), timeout=10)
            assert again.body.cpu_cores == 4 and again.body.memory_mb == 2048
