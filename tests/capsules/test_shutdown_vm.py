"""Ctrl-C of ``dovecote up`` loses nothing and leaves nothing burning, on real QEMU VMs.

One data directory lives through three ``dovecote up`` runs (see
``test_capsules_vm.py`` for the image cache and the skip rule):

1. the first run gets a capsule writing a counter to disk, and a second capsule
   its user pauses; SIGINT (Ctrl-C) stops the suite: no QEMU of the data
   directory runs afterwards (the warm pool's spare included), the counting
   capsule's memory is on disk;
2. the second run (``--keep-running``) resumes the counting capsule (same
   process, counter past its value before the stop, its file whole) and not the
   user-paused one; its SIGINT leaves the counting capsule's VM running;
3. the third run finds it running (reconcile keeps it), still counting; a
   SIGKILLed vmmgr, restarted by the supervisor, finds it so too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.capsules import (
    BOOT_TIMEOUT_S,
    IMAGE_DIR,
    Api,
    api_client,
    libvirt_ready,
    wait_status,
)
from tests.helpers.suite import Suite, destroy_vms_under

pytestmark = pytest.mark.slow

LOG = "/var/tmp/soak/count.log"
COUNTER = ("mkdir -p /var/tmp/soak; i=0; while true; do i=$((i+1)); echo $i >> " + LOG
           + "; sleep 0.2; done")
STOP_TIMEOUT_S = 240


class World:
    """The data directory, the suite running on it now, and the test's capsules."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.data_dir = top / "data"
        self.suite: Suite | None = None
        self.key = ""
        self.counting = ""
        self.napping = ""
        self.counter_pid = 0
        self.before_stop = 0

    def start(self, *args: str) -> Suite:
        self.suite = Suite(data_dir=self.data_dir, extra_args=list(args), extra_env={
            "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
            "DOVECOTE_VM_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S)})
        self.suite.wait_ready()
        self.data_dir.chmod(0o755)  # QEMU runs unprivileged: capsule files must be reachable
        return self.suite

    @property
    def api(self) -> Api:
        assert self.suite is not None and self.key
        return Api(self.suite, self.key)

    def sigint(self) -> None:
        """Ctrl-C, as a user would; the suite must exit cleanly within the stop budget."""
        assert self.suite is not None
        self.suite.proc.send_signal(signal.SIGINT)
        assert self.suite.proc.wait(STOP_TIMEOUT_S) == 0, "".join(self.suite.output[-80:])

    def out(self, capsule_id: str, cmd: str) -> str:
        response = self.api.post(f"/v1/capsules/{capsule_id}/exec", {"cmd": cmd})
        assert response.status_code == 200, response.text
        assert response.json()["exit_code"] == 0, response.text
        return str(response.json()["stdout"])

    def wait_exec(self, capsule_id: str, timeout: float = 300) -> None:
        """Until the capsule runs commands (a fresh vmmgr answers 503 while its driver comes up)."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.api.post(f"/v1/capsules/{capsule_id}/exec", {"cmd": "true"})
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert response.status_code == 200, response.text

    def counts(self) -> list[int]:
        """The counter's file, every line of it (it must read 1, 2, 3... with no gap)."""
        return [int(line) for line in self.out(self.counting, f"cat {LOG}").split()]


def qemu_of(directory: Path) -> list[int]:
    """The pids of QEMU processes whose command line names a file under ``directory``."""
    root = str(directory.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu" in cmdline and root + "/" in cmdline:
            found.append(int(entry.name))
    return found


def vmmgr_pid_of(suite: Suite) -> int:
    """vmmgr's pid as /healthz tells it, 0 while it does not answer."""
    try:
        details = httpx.get(suite.url + "/healthz", timeout=5).json()["services"]["vmmgr"]
        return int(details.get("details", {}).get("pid") or 0)
    except (httpx.HTTPError, KeyError, ValueError):
        return 0


def events_of(suite: Suite, key: str, capsule_id: str, until: str,
              timeout: float = 60) -> list[dict[str, Any]]:
    """The team's logged events about ``capsule_id``, read from the start of the log
    over SSE until one named ``until`` arrives."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", suite.url + "/v1/events/stream", params={"after": 0},
                      headers={"X-API-Key": key}, timeout=httpx.Timeout(10, read=timeout)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                break
            if not line.startswith("data:"):
                continue
            data = json.loads(line[5:])
            if not isinstance(data, dict) or data.get("resource", {}).get("id") != capsule_id:
                continue
            seen.append(data)
            if data.get("event") == until:
                return seen
    raise AssertionError(f"no {until} event for {capsule_id}: {[e.get('event') for e in seen]}")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = libvirt_ready()
    if reason:
        pytest.fail(f"VM tests need libvirt (infra/system-deps.sh installs it): {reason}")
    top = Path(tempfile.mkdtemp(prefix="dcstop-", dir="/tmp"))
    top.chmod(0o755)
    Path(IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    world = World(top)
    try:
        yield world
    except BaseException:
        if world.suite is not None:
            print("".join(world.suite.output[-200:]))
        raise
    finally:
        if world.suite is not None:
            world.suite.stop()
        destroy_vms_under(world.data_dir)
        shutil.rmtree(top, ignore_errors=True)


def test_ctrl_c_pauses_running_capsules_and_leaves_no_qemu(world: World) -> None:
    suite = world.start()
    browser_api = api_client(suite, "Ana")
    world.key = browser_api.http.headers["X-API-Key"]
    api = world.api
    ids = []
    deadline = time.monotonic() + 1800  # a first build of the image and template takes minutes
    while len(ids) < 2:
        response = api.post("/v1/capsules", {"template": "minimal"})
        if response.status_code == 503 and time.monotonic() < deadline:
            time.sleep(5)
            continue
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    world.counting, world.napping = ids
    for capsule_id in ids:
        wait_status(api, capsule_id, "running")
    started = api.post(f"/v1/capsules/{world.counting}/exec",
                       {"cmd": COUNTER, "background": True, "tag": "counter"})
    assert started.status_code == 202, started.text
    world.counter_pid = started.json()["pid"]
    assert api.post(f"/v1/capsules/{world.napping}/pause").status_code == 202
    wait_status(api, world.napping, "paused", timeout=180)
    time.sleep(2)
    world.before_stop = world.counts()[-1]
    assert world.before_stop >= 5
    assert qemu_of(world.data_dir), "the running capsule's QEMU should be found while it runs"

    world.sigint()
    assert any(line.startswith("Pausing capsules") for line in suite.output)
    # Nothing burns: no QEMU of this installation is left, spares included.
    assert qemu_of(world.data_dir) == [], "QEMU still running after dovecote up stopped"
    # The counting capsule's memory went to disk (the user-paused one's was already there).
    for capsule_id in ids:
        assert (world.data_dir / "capsules" / capsule_id / "memory.sav").stat().st_size > 0


def test_the_next_up_resumes_exactly_the_capsules_the_stop_paused(world: World) -> None:
    world.start("--keep-running")
    api = world.api
    body = wait_status(api, world.counting, "running", timeout=300)
    assert body["status"] == "running"
    # The same process, counting on from where it was, its file whole.
    processes = api.get(f"/v1/capsules/{world.counting}/processes").json()["processes"]
    assert any(p["pid"] == world.counter_pid and p["tag"] == "counter" for p in processes), processes
    time.sleep(2)
    counts = world.counts()
    assert counts[-1] > world.before_stop
    assert counts == list(range(1, len(counts) + 1)), "the counter's file lost or mangled lines"
    # The user's pause is the user's: still paused.
    assert api.get(f"/v1/capsules/{world.napping}").json()["status"] == "paused"
    # The log tells why: paused by the shutdown, then resumed.
    assert world.suite is not None
    events = events_of(world.suite, world.key, world.counting, until="capsule.resume")
    pauses = [e for e in events if e["event"] == "capsule.pause"]
    assert pauses and pauses[-1]["metadata"]["reason"] == "shutdown", pauses


def test_keep_running_leaves_the_capsule_running_and_the_next_up_keeps_it(world: World) -> None:
    before = world.counts()[-1]
    world.sigint()  # this suite was started with --keep-running
    assert world.suite is not None
    assert not any(line.startswith("Pausing capsules") for line in world.suite.output)
    assert qemu_of(world.data_dir), "--keep-running: the capsule's QEMU should still run"
    time.sleep(1)
    world.start()
    api = world.api
    assert api.get(f"/v1/capsules/{world.counting}").json()["status"] == "running"
    world.wait_exec(world.counting)
    counts = world.counts()
    assert counts[-1] > before + 5  # it counted while no vmmgr was there
    assert counts == list(range(1, len(counts) + 1))
    processes = api.get(f"/v1/capsules/{world.counting}/processes").json()["processes"]
    assert any(p["pid"] == world.counter_pid for p in processes), processes

    # A SIGKILLed vmmgr stops nothing (no graceful stop): restarted by the supervisor,
    # it reconciles and finds the capsule running, still counting.
    assert world.suite is not None
    vmmgr_pid = vmmgr_pid_of(world.suite)
    before = world.counts()[-1]
    os.kill(vmmgr_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while vmmgr_pid_of(world.suite) in (0, vmmgr_pid):
        assert time.monotonic() < deadline, "vmmgr was not restarted"
        time.sleep(0.5)
    world.wait_exec(world.counting)
    assert api.get(f"/v1/capsules/{world.counting}").json()["status"] == "running"
    assert world.counts()[-1] > before
    assert qemu_of(world.data_dir)

    for capsule_id in (world.counting, world.napping):
        assert api.delete(f"/v1/capsules/{capsule_id}").status_code == 202
    for capsule_id in (world.counting, world.napping):
        wait_status(api, capsule_id, "stopped", timeout=120)
    world.sigint()
    assert qemu_of(world.data_dir) == []
