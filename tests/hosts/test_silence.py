"""Time-bound host behaviour, on a suite of its own with short limits: a host
silent for ``DOVECOTE_HOST_SILENCE_S`` becomes ``unreachable`` (audited and
published on ``host.state.changed``), a heartbeat brings it back, and a
registration token expires after ``DOVECOTE_HOST_REGISTRATION_TTL_S``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from dovecote.bus.messages.hosts import HOST_STATE_TOPIC, HostStateChanged
from dovecote.services.client import open_cli_bus
from tests.accounts.helpers import Browser
from tests.helpers.suite import Suite
from tests.hosts.helpers import create_admin, create_host, eventually, heartbeat, register

SILENCE_S = 2
REGISTRATION_TTL_S = 3


@pytest.fixture(scope="module")
def short_suite() -> Iterator[Suite]:
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000",
                             "DOVECOTE_HOST_SILENCE_S": str(SILENCE_S),
                             "DOVECOTE_HOST_REGISTRATION_TTL_S": str(REGISTRATION_TTL_S)})
    try:
        suite.wait_ready()
        yield suite
    finally:
        suite.stop()


@pytest.fixture(scope="module")
def admin(short_suite: Suite) -> tuple[Browser, dict[str, Any]]:
    return create_admin(short_suite)


def test_an_expired_registration_token_is_refused(short_suite: Suite,
                                                 admin: tuple[Browser, Any]) -> None:
    browser, _ = admin
    token = create_host(browser)["registration_token"]
    time.sleep(REGISTRATION_TTL_S + 0.5)
    response = register(short_suite, token)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_token"


async def test_a_silent_host_becomes_unreachable_and_a_heartbeat_revives_it(
        short_suite: Suite, admin: tuple[Browser, Any]) -> None:
    browser, _ = admin
    changes: list[HostStateChanged] = []
    with trio.fail_after(60):
        async with open_cli_bus(short_suite.data_dir) as bus:
            async with bus.subscribe(HOST_STATE_TOPIC) as events:

                async def next_change(host_id: str) -> HostStateChanged:
                    async for _topic, event in events:
                        if isinstance(event, HostStateChanged) and event.host_id == host_id:
                            changes.append(event)
                            return event
                    raise AssertionError("the subscription ended")

                created = await trio.to_thread.run_sync(create_host, browser)
                host_id = created["host"]["id"]
                registered = await trio.to_thread.run_sync(
                    register, short_suite, created["registration_token"])
                assert registered.status_code == 201
                jwt = registered.json()["token"]
                first = await next_change(host_id)
                assert (first.old_status, first.new_status) == ("pending", "online")
                assert first.team_id is None

                # Silence: unreachable within a few seconds, once.
                began = trio.current_time()
                silent = await next_change(host_id)
                assert (silent.old_status, silent.new_status) == ("online", "unreachable")
                assert trio.current_time() - began < SILENCE_S + 10
                host = await trio.to_thread.run_sync(browser.get, f"/v1/hosts/{host_id}")
                assert host.json()["status"] == "unreachable"

                # A heartbeat brings it back online.
                beat = await trio.to_thread.run_sync(heartbeat, short_suite, host_id, jwt)
                assert beat.status_code == 204
                back = await next_change(host_id)
                assert (back.old_status, back.new_status) == ("unreachable", "online")

    entries = browser.get("/v1/admin/audit-logs", params={"limit": 200}).json()["entries"]
    causes = [e["metadata"].get("cause") for e in reversed(entries)
              if e["resource_id"] == host_id and e["action"] == "status_change"]
    assert causes[:2] == ["silence", "heartbeat"]


def test_unreachable_shows_in_the_listing(short_suite: Suite, admin: tuple[Browser, Any]) -> None:
    browser, _ = admin
    created = create_host(browser)
    assert register(short_suite, created["registration_token"]).status_code == 201
    host_id = created["host"]["id"]

    def status() -> str:
        hosts = {h["id"]: h for h in browser.get("/v1/hosts").json()}
        return str(hosts[host_id]["status"])

    assert status() == "online"
    eventually(lambda: status() == "unreachable", timeout=SILENCE_S + 15)
