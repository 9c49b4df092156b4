"""``dovecote up`` as a user runs it: a real process tree, real HTTP.

One suite is started for the module (embedded PostgreSQL, the broker and six
service processes) and shared by the tests, which run in file order: the last
one stops it with SIGINT, as Ctrl-C would, and checks that nothing is left.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.suite import Suite, get_json

SERVICES = {"gateway", "auth", "vmmgr", "recorder", "notifier", "metrics", "agents", "desktops", "browsers",
            "runs"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _pids(suite: Suite) -> dict[str, int]:
    _, body = get_json(suite.url + "/healthz")
    return {name: int(s["details"]["pid"]) for name, s in body["services"].items()
            if s.get("details", {}).get("pid")}


@pytest.fixture(scope="module")
def suite() -> Iterator[Suite]:
    suite = Suite()
    try:
        suite.wait_ready()
        yield suite
    finally:
        suite.stop()


def test_healthz_lists_every_service_up(suite: Suite) -> None:
    status, body = get_json(suite.url + "/healthz")
    assert status == 200, body
    assert body["status"] == "ok"
    assert set(body["services"]) == SERVICES
    assert body["failing"] == []
    assert all(s["status"] == "ok" for s in body["services"].values())


def test_openapi_document_is_served(suite: Suite) -> None:
    status, doc = get_json(suite.url + "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    assert "/healthz" in doc["paths"]


def test_unknown_path_gets_the_documented_error_shape(suite: Suite) -> None:
    status, body = get_json(suite.url + "/v1/nope")
    assert status == 404
    assert body["error"]["code"] == "not_found"


def test_a_service_killed_with_sigkill_is_restarted_within_10s(suite: Suite) -> None:
    before = _pids(suite)
    os.kill(before["auth"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body = get_json(suite.url + "/healthz")
        if status == 503:
            assert "auth" in body["failing"]
        if status == 200 and _pids(suite).get("auth") not in (None, before["auth"]):
            break
        time.sleep(0.2)
    else:
        pytest.fail("auth was not back within 10 s:\n" + "".join(suite.output[-40:]))
    assert _pids(suite)["gateway"] == before["gateway"]  # nothing else was touched
    assert any("restarting" in line and "auth" in line for line in suite.output)


def test_ctrl_c_stops_everything_and_leaves_no_process(suite: Suite) -> None:
    pids = list(_pids(suite).values())
    postmaster = suite.data_dir / "postgres" / "postmaster.pid"
    pg_pid = int(postmaster.read_text().split()[0]) if postmaster.exists() else None
    children = [int(p) for p in Path(f"/proc/{suite.proc.pid}/task/{suite.proc.pid}/children")
                .read_text().split()]
    suite.proc.send_signal(signal.SIGINT)
    assert suite.proc.wait(60) == 0
    deadline = time.monotonic() + 10
    leftover = pids + children + ([pg_pid] if pg_pid else [])
    while time.monotonic() < deadline and any(_alive(p) for p in leftover):
        time.sleep(0.2)
    assert [p for p in leftover if _alive(p)] == []
