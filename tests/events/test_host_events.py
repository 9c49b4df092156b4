"""Host-side events over real HTTP: the ``/v1/hosts/sandbox-events`` callback and the
``host.up``/``host.down`` events auth records when a host's status changes."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import psycopg
import pytest
import trio

from dovecote.libs.embedded_pg import start_embedded_postgres
from tests.accounts.helpers import Browser
from tests.events.conftest import Member
from tests.events.fakes import Frame, capsule_event
from tests.events.helpers import open_sse, record
from tests.helpers.suite import Suite
from tests.hosts.helpers import agent, create_host, heartbeat, register

ADMIN_STREAM = "/v1/admin/events/stream"
CALLBACK = "/v1/hosts/sandbox-events"


def registered_host(suite: Suite, browser: Browser, **body: Any) -> tuple[str, str]:
    """A new host, registered: (host id, host JWT)."""
    created = create_host(browser, **body)
    registered = register(suite, created["registration_token"])
    assert registered.status_code == 201, registered.text
    return created["host"]["id"], registered.json()["token"]


def insert_capsule(suite: Suite, team_id: str, host_id: str, status: str = "running") -> str:
    """A capsule record of ``team_id`` on ``host_id`` (no VM: vmmgr only reads the record here)."""
    capsule_id = "cl-" + secrets.token_hex(6)
    url = start_embedded_postgres(suite.data_dir).url  # the suite's own cluster, borrowed
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO vmmgr.capsules (id, team_id, host_id, template, vcpus, memory_mb, "
                     "disk_size_mb, status) VALUES (%s, %s, %s, 'minimal', 1, 512, 5120, %s)",
                     (capsule_id, team_id, host_id, status))
    return capsule_id


def report(suite: Suite, token: str | None, body: Any, **kw: Any) -> httpx.Response:
    headers = {"X-Host-Token": token} if token else {}
    with agent(suite) as http:
        if isinstance(body, bytes):
            return http.post(CALLBACK, content=body,
                             headers={**headers, "Content-Type": "application/json"})
        return http.post(CALLBACK, json=body, headers=headers, **kw)


@pytest.fixture(scope="module")
def host(events_suite: Suite, admin: tuple[Browser, Any]) -> tuple[str, str]:
    return registered_host(events_suite, admin[0])


@pytest.fixture(scope="module")
def capsule(events_suite: Suite, team_a: Member, host: tuple[str, str]) -> str:
    return insert_capsule(events_suite, team_a.team_id, host[0])


def test_the_callback_needs_a_host_token(events_suite: Suite, host: tuple[str, str],
                                         capsule: str, team_a: Member) -> None:
    body = {"event": "sandbox.stopped", "sandbox_id": capsule, "host_id": host[0]}
    for token in (None, "not-a-jwt"):
        response = report(events_suite, token, body)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    # A user's credentials are not a host's.
    response = team_a.browser.post(CALLBACK, body, headers={"X-API-Key": team_a.key})
    assert response.status_code == 401


def test_bad_bodies_are_400(events_suite: Suite, host: tuple[str, str], capsule: str) -> None:
    host_id, jwt = host
    good = {"event": "sandbox.stopped", "sandbox_id": capsule, "host_id": host_id}
    for body in (b"{not json", {"sandbox_id": capsule, "host_id": host_id},
                 {**good, "event": ""}, {**good, "event": "Sandbox Stopped"},
                 {**good, "event": "x" * 65}, {**good, "sandbox_id": ""},
                 {**good, "sandbox_id": 42}, {**good, "timestamp": -1},
                 {**good, "timestamp": "yesterday"}, {**good, "timestamp": 10**17}, [good]):
        response = report(events_suite, jwt, body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["code"] in ("invalid_request", "invalid_json")


def test_a_host_reports_only_for_itself_and_its_capsules(
        events_suite: Suite, admin: tuple[Browser, Any], team_a: Member, host: tuple[str, str],
        capsule: str) -> None:
    host_id, jwt = host
    other_id, _ = registered_host(events_suite, admin[0])
    response = report(events_suite, jwt, {"event": "sandbox.stopped", "sandbox_id": capsule,
                                          "host_id": other_id})
    assert response.status_code == 403 and response.json()["error"]["code"] == "host_mismatch"
    elsewhere = insert_capsule(events_suite, team_a.team_id, other_id)
    response = report(events_suite, jwt, {"event": "sandbox.stopped", "sandbox_id": elsewhere,
                                          "host_id": host_id})
    assert response.status_code == 403 and response.json()["error"]["code"] == "host_mismatch"
    response = report(events_suite, jwt, {"event": "sandbox.stopped", "sandbox_id": "cl-nothing",
                                          "host_id": host_id})
    assert response.status_code == 404


async def test_reports_become_events_of_the_capsules_team(
        events_suite: Suite, team_a: Member, team_b: Member, host: tuple[str, str],
        capsule: str) -> None:
    host_id, jwt = host

    async def send(body: dict[str, Any]) -> None:
        response = await trio.to_thread.run_sync(lambda: report(events_suite, jwt, body))
        assert response.status_code == 204, response.text
        assert response.content == b""

    async def reported() -> Frame:
        """The next event the host caused (vmmgr may report the capsule meanwhile: its host
        falls silent after a few seconds here, and its capsules become ``missing``)."""
        while True:
            frame = await a.frame()
            if frame.data["actor"].get("id") == host_id:
                return frame

    with trio.fail_after(60):
        async with open_sse(events_suite, key=team_a.key) as a, \
                open_sse(events_suite, key=team_b.key) as b:
            for sse in (a, b):
                await sse.frame()
            base = {"sandbox_id": capsule, "host_id": host_id}
            await send({**base, "event": "sandbox.auto_paused", "timestamp": 1767225600})
            paused = await reported()
            assert paused.event == "capsule.pause" and paused.data["outcome"] == "success"
            assert paused.data["resource"] == {"id": capsule, "type": "capsule"}
            assert paused.data["metadata"]["reason"] == "ttl_expired"
            assert paused.data["timestamp"] == "2026-01-01T00:00:00Z"
            assert paused.data["sandbox"]["id"] == capsule
            assert paused.data["sandbox"]["status"] == "paused"
            assert paused.data["actor"]["type"] == "system"

            await send({**base, "event": "sandbox.stopped", "timestamp": 1767225600123})  # ms
            stopped = await reported()
            assert stopped.event == "capsule.destroy" and stopped.data["outcome"] == "success"
            assert stopped.data["timestamp"].startswith("2026-01-01T00:00:00.123")

            await send({**base, "event": "sandbox.error", "extra": "ignored"})
            failed = await reported()
            assert failed.event == "capsule.state.changed" and "outcome" not in failed.data
            assert failed.data["error"]
            assert failed.data["metadata"]["from"] in ("running", "missing")
            assert failed.data["metadata"]["to"] == "error"

            await send({**base, "event": "sandbox.migrated"})  # unknown: recorded as it came
            unknown = await reported()
            assert unknown.event == "sandbox.migrated"
            assert unknown.data["resource"]["id"] == capsule

            # Team B saw none of it: its next event is its own.
            marker = await record(events_suite, team_b.team_id, capsule_event("b-marker"))
            assert [f.id for f in await b.events(1)] == marker
            assert paused.id is not None and unknown.id is not None and unknown.id < marker[0]


async def test_a_platform_host_going_down_and_up_is_on_the_admin_stream_only(
        events_suite: Suite, admin: tuple[Browser, Any], team_a: Member) -> None:
    with trio.fail_after(90):
        async with open_sse(events_suite, ADMIN_STREAM, cookies=admin[0].http.cookies) as every, \
                open_sse(events_suite, key=team_a.key) as team:
            for sse in (every, team):
                await sse.frame()
            host_id, jwt = await trio.to_thread.run_sync(registered_host, events_suite, admin[0])
            up = await every.until(host_id)
            assert up.event == "host.up"
            assert up.data["resource"] == {"id": host_id, "type": "host"}
            assert up.data["metadata"] == {"from": "pending", "to": "online"}
            assert "outcome" not in up.data and "sandbox" not in up.data
            down = await every.until(host_id)  # silent for DOVECOTE_HOST_SILENCE_S
            assert down.event == "host.down" and down.data["metadata"]["to"] == "unreachable"
            assert down.id is not None and up.id is not None and down.id > up.id
            beat = await trio.to_thread.run_sync(heartbeat, events_suite, host_id, jwt)
            assert beat.status_code == 204
            back = await every.until(host_id)
            assert back.event == "host.up" and back.data["metadata"]["from"] == "unreachable"
            marker = await record(events_suite, team_a.team_id, capsule_event("a-marker"))
            before = []  # (vmmgr may report team A's capsules on a silent host meanwhile)
            while (frame := await team.frame()).id != marker[0]:
                before.append(frame)
            assert not [f for f in before if f.event.startswith("host.")], before


async def test_a_byoc_host_going_up_is_on_its_teams_stream(
        events_suite: Suite, admin: tuple[Browser, Any], team_b: Member) -> None:
    root = admin[0]
    enabled = root.send("PUT", f"/v1/admin/teams/{team_b.team_id}/byoc", {"byoc": True})
    assert enabled.status_code == 204, enabled.text
    with trio.fail_after(60):
        async with open_sse(events_suite, key=team_b.key) as team:
            await team.frame()
            host_id, _ = await trio.to_thread.run_sync(
                lambda: registered_host(events_suite, team_b.browser, type="byoc",
                                        team_id=team_b.team_id))
            up = await team.frame()
            assert (up.event, up.data["resource"]["id"]) == ("host.up", host_id)
