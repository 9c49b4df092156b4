"""A registered host restarts as itself: ``dovecote vmmgr`` with no flags.

A second vmmgr process joins the suite with ``--register TOKEN
--control-plane URL`` (its own data directory, the suite's bus and
database, no VM driver), is SIGKILLed and started again with no flags: it
loads ``host.json``, serves as ``vmmgr.<its host id>`` and heartbeats, never
as the control plane's ``local``. Once the operator deletes the host, the
running vmmgr stops by itself with the reason, and a later start refuses.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio

from dovecote.bus.messages.health import Ping, Pong
from dovecote.services.client import open_cli_bus
from tests.helpers.suite import Suite, free_port
from tests.hosts.helpers import HostProcess, create_admin, create_host, eventually


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


def _until_serving(suite: Suite, host: HostProcess, host_id: str) -> None:
    """Wait until the host's vmmgr serves as ``vmmgr.<host_id>``; on failure, say what it logged."""
    try:
        eventually(lambda: _serves(suite, f"vmmgr.{host_id}"), timeout=60)
    except AssertionError:
        running = host.proc is not None and host.proc.poll() is None
        tail = host.log.read_text(errors="replace")[-6000:] if host.log.exists() else "(no log)"
        raise AssertionError(f"vmmgr.{host_id} never answered (process running: {running}); "
                             f"its log ends:\n{tail}") from None


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
    _until_serving(suite, host, host_id)
    assert (host.data_dir / "host.json").exists()

    host.kill()
    before = admin.get(f"/v1/hosts/{host_id}").json()["last_heartbeat_at"]
    host.start()  # no flags: the stored registration decides who it is
    _until_serving(suite, host, host_id)
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
    _until_serving(suite, host, host_id)

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
    _until_serving(suite, host, host_id)
    host.kill()
    # The stored control plane URL now points nowhere (a partition, a restart).
    creds = (host.data_dir / "host.json").read_text()
    dead = f"http://127.0.0.1:{free_port()}"
    (host.data_dir / "host.json").write_text(creds.replace(suite.url, dead))
    host.start()
    _until_serving(suite, host, host_id)
    assert "cannot reach the control plane" in host.log.read_text()
    assert host.proc is not None and host.proc.poll() is None
