"""Pre-started VMs on real QEMU (``vmmgr/pool.py``): with no warm spares, a ``minimal``
create claims a QEMU that libvirt started ahead of time, paused and waiting for the
template's device state; the capsule works, has an identity of its own, and the pool
starts another one.

Over real HTTP against ``dovecote up`` with the libvirt driver (``DOVECOTE_VM_POOL_SIZE=0``,
``DOVECOTE_VM_PRESTARTED=1``); what the pool holds is read from vmmgr's health
(``prestarted``, ``prestarted_claims``), the waiting VM itself from libvirt's domain list
and the capsule directories. The tests run in file order on one suite; the last one
SIGKILLs vmmgr and finds the waiting QEMU destroyed as an orphan by the next vmmgr's reconcile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.capsules import Api, VmmgrHealth, domains, running_capsule, wait_status
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow

ENV = {"DOVECOTE_VM_POOL_SIZE": "0", "DOVECOTE_VM_TEAM_SPARES": "0", "DOVECOTE_VM_PRESTARTED": "1"}


class World(VmmgrHealth):
    def __init__(self, suite: Suite, ana: Api, first: str) -> None:
        self.suite, self.ana, self.first = suite, ana, first
        self.claimed: str | None = None

    def out(self, capsule_id: str, cmd: str) -> str:
        response = self.ana.post(f"/v1/capsules/{capsule_id}/exec", {"cmd": cmd})
        assert response.status_code == 200 and response.json()["exit_code"] == 0, response.text
        return str(response.json()["stdout"])

    def waiting_vms(self) -> set[str]:
        """Capsule directories without a record whose domain libvirt holds paused."""
        import libvirt

        known = {c["id"] for c in self.ana.get("/v1/capsules").json()}
        root = self.suite.data_dir / "capsules"
        dirs = {p.name for p in Path(root).iterdir() if p.is_dir() and p.name not in known}
        conn = libvirt.open("qemu:///system")
        try:
            paused = {dom.name() for dom in conn.listAllDomains(0)
                      if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED}
        finally:
            conn.close()
        return {d for d in dirs if f"dovecote-{d}" in paused}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running_capsule("dcprestart-", extra_env=ENV) as (suite, ana, first):
        yield World(suite, ana, first)


def test_a_create_without_a_spare_claims_the_prestarted_qemu(world: World) -> None:
    world.wait_count("prestarted", 1)
    assert world.count("spares") == 0
    (waiting,) = world.waiting_vms()
    claims = world.count("prestarted_claims")

    created = world.ana.post("/v1/capsules", {})
    assert created.status_code == 202, created.text
    capsule_id = created.json()["id"]
    assert capsule_id == waiting  # the pre-started QEMU's id is the capsule's
    wait_status(world.ana, capsule_id, "running", timeout=300)
    world.claimed = capsule_id
    assert world.count("prestarted_claims") == claims + 1


def test_the_claimed_capsule_works_with_an_identity_of_its_own(world: World) -> None:
    capsule_id = world.claimed
    assert capsule_id is not None
    assert world.out(capsule_id, "echo hello && uname -s") == "hello\nLinux\n"
    assert world.out(capsule_id, "hostname").strip() == capsule_id
    machine_id = world.out(capsule_id, "cat /etc/machine-id").strip()
    other = world.out(world.first, "cat /etc/machine-id").strip()
    assert len(machine_id) == 32 and machine_id != other
    assert world.out(world.first, "hostname").strip() == world.first != capsule_id
    # The clock was pushed: the guest's time is the host's within a few seconds.
    guest_now = float(world.out(capsule_id, "date +%s").strip())
    assert abs(guest_now - time.time()) < 30
    record = world.ana.get(f"/v1/capsules/{capsule_id}").json()
    assert record["template"] == "minimal" and record["disk_used_mb"] > 0, record


def test_the_pool_prestarts_another_one(world: World) -> None:
    world.wait_count("prestarted", 1)
    waiting = world.waiting_vms()
    assert len(waiting) == 1 and world.claimed not in waiting, waiting
    for capsule_id in (world.claimed, world.first):
        assert world.ana.delete(f"/v1/capsules/{capsule_id}").status_code == 202
        wait_status(world.ana, capsule_id, "stopped", timeout=120)


def test_after_a_vmmgr_crash_reconcile_destroys_the_waiting_qemu(world: World) -> None:
    import os
    import signal

    (old,) = world.waiting_vms()
    pid = int(world.vmmgr()["pid"])
    os.kill(pid, signal.SIGKILL)  # `dovecote up` starts vmmgr again; libvirt keeps the VM
    deadline = time.monotonic() + 300
    while True:
        try:
            details = world.vmmgr()
        except (httpx.HTTPError, KeyError, ValueError):
            details = {}
        if details.get("pid") not in (None, str(pid)) and details.get("prestarted") == "1":
            break
        assert time.monotonic() < deadline, f"vmmgr never came back with a pre-started VM: {details}"
        time.sleep(0.5)
    assert f"dovecote-{old}" not in domains()  # an orphan: no record, not the new pool's
    (new,) = world.waiting_vms()
    assert new != old
