"""A registered host restarts as itself: ``dovecote vmmgr`` with no flags.

A second vmmgr process joins the suite with ``--register TOKEN
--control-plane URL`` (its own data directory, the suite's bus and
database, no VM driver), is SIGKILLed and started again with no flags: it
loads ``host.json``, serves as ``vmmgr.<its host id>`` and heartbeats, never
as the control plane's ``local``. Once the operator deletes the host, the
running vmmgr stops by itself with the reason, and a later start refuses.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from dovecote.bus.messages.health import Ping, Pong
from dovecote.services.client import open_cli_bus
from tests.helpers.suite import Suite
from tests.hosts.helpers import create_admin, create_host, eventually


def _child_env(suite: Suite, service: str) -> dict[str, str]:
    """The environment ``dovecote up`` gave one of its children (bus and database)."""
    out = subprocess.run(["pgrep", "-f", f"dovecote.services.cli {service}$"], capture_output=True,
                         text=True, check=False).stdout.split()
    for pid in out:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        if env.get("DOVECOTE_DATA_DIR") == str(suite.data_dir):
            return env
    raise AssertionError(f"no {service} child of the suite found")


class HostProcess:
    """``dovecote vmmgr`` as a second machine would run it, in its own data directory."""

    def __init__(self, suite: Suite) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="dchost-"))
        env = _child_env(suite, "vmmgr")
        env = {k: v for k, v in env.items() if k not in ("DOVECOTE_HOST_ID", "DOVECOTE_PARENT_PID")}
        self.env = {**env, "DOVECOTE_DATA_DIR": str(self.data_dir), "DOVECOTE_VM_DRIVER": "none",
                    "DOVECOTE_HOST_HEARTBEAT_S": "1"}
        self.proc: subprocess.Popen[str] | None = None
        self.log = self.data_dir / "vmmgr.log"

    def start(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "dovecote.services.cli", "vmmgr", *args],
                                     env=self.env, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                     text=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def suite() -> Iterator[Suite]:
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000"})
    try:
        suite.wait_ready()
        yield suite
    finally:
        suite.stop()


@pytest.fixture
def host(suite: Suite) -> Iterator[HostProcess]:
    process = HostProcess(suite)
    try:
        yield process
    finally:
        process.close()


def _serves(suite: Suite, name: str) -> bool:
    """Whether some process answers the health RPC under bus name ``name``."""
    async def ask() -> bool:
        async with open_cli_bus(suite.data_dir) as bus:
            try:
                pong: Pong = await bus.request(name, Ping(), timeout=2)
            except Exception:
                return False
            return pong.service == "vmmgr"

    return trio.run(ask)


def test_a_registered_host_restarts_as_itself_with_no_flags(suite: Suite, host: HostProcess) -> None:
    admin, _ = create_admin(suite, "Restarter")
    created = create_host(admin)
    host_id = created["host"]["id"]
    host.start("--register", created["registration_token"], "--control-plane", suite.url)
    eventually(lambda: _serves(suite, f"vmmgr.{host_id}"), timeout=60)
    assert (host.data_dir / "host.json").exists()

    host.kill()
    before = admin.get(f"/v1/hosts/{host_id}").json()["last_heartbeat_at"]
    host.start()  # no flags: the stored registration decides who it is
    eventually(lambda: _serves(suite, f"vmmgr.{host_id}"), timeout=60)
    eventually(lambda: admin.get(f"/v1/hosts/{host_id}").json()["last_heartbeat_at"] != before,
               timeout=30)
    assert admin.get(f"/v1/hosts/{host_id}").json()["status"] == "online"
    assert host.proc is not None and host.proc.poll() is None


def test_a_deleted_host_stops_with_the_reason_and_does_not_start_again(
        suite: Suite, host: HostProcess) -> None:
    admin, _ = create_admin(suite, "Deleter")
    created = create_host(admin)
    host_id = created["host"]["id"]
    host.start("--register", created["registration_token"], "--control-plane", suite.url)
    eventually(lambda: _serves(suite, f"vmmgr.{host_id}"), timeout=60)

    deleted = admin.send("DELETE", f"/v1/hosts/{host_id}")
    assert deleted.status_code == 204, deleted.text
    assert host.proc is not None
    host.proc.wait(60)  # the heartbeat is refused: vmmgr stops by itself
    assert "register the host again" in host.log.read_text() or "refused" in host.log.read_text()

    again = subprocess.run([sys.executable, "-m", "dovecote.services.cli", "vmmgr"], env=host.env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1
    assert "refused" in again.stderr, again.stderr


def test_a_host_starts_as_itself_while_the_control_plane_is_away(suite: Suite, host: HostProcess) -> None:
    admin, _ = create_admin(suite, "Partitioned")
    created = create_host(admin)
    host_id = created["host"]["id"]
    host.start("--register", created["registration_token"], "--control-plane", suite.url)
    eventually(lambda: _serves(suite, f"vmmgr.{host_id}"), timeout=60)
    host.kill()
    # The stored control plane URL now points nowhere (a partition, a restart).
    creds = (host.data_dir / "host.json").read_text()
    dead = f"http://127.0.0.1:{_closed_port()}"
    (host.data_dir / "host.json").write_text(creds.replace(suite.url, dead))
    host.start()
    eventually(lambda: _serves(suite, f"vmmgr.{host_id}"), timeout=60)
    assert "cannot reach the control plane" in host.log.read_text()
    assert host.proc is not None and host.proc.poll() is None


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

