"""``dovecote up`` as a user runs it: a real process tree, real HTTP.

One suite is started for the module (embedded PostgreSQL, the broker and six
service processes) and shared by the tests, which run in file order: the last
one stops it with SIGINT, as Ctrl-C would, and checks that nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVICES = {"gateway", "auth", "vmmgr", "recorder", "notifier", "metrics"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


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


class Suite:
    def __init__(self, proc: subprocess.Popen[str], url: str, data_dir: Path) -> None:
        self.proc = proc
        self.url = url
        self.data_dir = data_dir
        self.output: list[str] = []

    def health(self) -> tuple[int, dict]:
        return _get(self.url + "/healthz")

    def pids(self) -> dict[str, int]:
        _, body = self.health()
        return {name: int(s["details"]["pid"]) for name, s in body["services"].items()
                if s.get("details", {}).get("pid")}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    data_dir = tmp_path_factory.mktemp("up") / "data"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOVECOTE_", "DATABASE_URL"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dovecote.services.cli", "up", "--port", str(port),
         "--data-dir", str(data_dir), "--grace", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    suite = Suite(proc, f"http://127.0.0.1:{port}", data_dir)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            suite.output.append(line)
            if line.startswith("Dovecote is up"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(180):
            pytest.fail("dovecote up did not become healthy:\n" + "".join(suite.output[-60:]))
        yield suite
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_healthz_lists_every_service_up(suite: Suite) -> None:
    status, body = suite.health()
    assert status == 200, body
    assert body["status"] == "ok"
    assert set(body["services"]) == SERVICES
    assert body["failing"] == []
    assert all(s["status"] == "ok" for s in body["services"].values())


def test_openapi_document_is_served(suite: Suite) -> None:
    status, doc = _get(suite.url + "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    assert "/healthz" in doc["paths"]


def test_unknown_path_gets_the_documented_error_shape(suite: Suite) -> None:
    status, body = _get(suite.url + "/v1/nope")
    assert status == 404
    assert body["error"]["code"] == "not_found"


def test_a_service_killed_with_sigkill_is_restarted_within_10s(suite: Suite) -> None:
    before = suite.pids()
    os.kill(before["auth"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body = suite.health()
        if status == 503:
            assert "auth" in body["failing"]
        if status == 200 and suite.pids().get("auth") not in (None, before["auth"]):
            break
        time.sleep(0.2)
    else:
        pytest.fail("auth was not back within 10 s:\n" + "".join(suite.output[-40:]))
    assert suite.pids()["gateway"] == before["gateway"]  # nothing else was touched
    assert any("restarting" in line and "auth" in line for line in suite.output)


def test_ctrl_c_stops_everything_and_leaves_no_process(suite: Suite) -> None:
    pids = list(suite.pids().values())
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
