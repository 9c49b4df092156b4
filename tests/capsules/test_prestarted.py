"""Claiming a pre-started VM (``vmmgr/pool.py``, ``vmmgr/lifecycle.py``) without QEMU: a
``minimal`` create with no warm spare takes the pre-started VM's id, its device state is
loaded (:meth:`Driver.finish_restore`) and a fresh identity pushed before ``running``; one
whose template changed is destroyed, never claimed; a driver that cannot pre-start gets
none and creates restore as usual.

The hypervisor is :class:`~tests.capsules.fakes.AgentProcessDriver` (the real guest agent in
a host process) with pre-starting added: a pre-started "VM" is only remembered, its agent
process starts at :meth:`finish_restore`. The database is real; what the pool holds is read
from :meth:`Capsules.statistics` (vmmgr's health). The same on real VMs:
``test_prestarted_vm.py``.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest
import trio

from dovecote.bus.messages import capsules as m
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.driver import DriverError, VmHandle, VmInfo, VmSpec, VmState
from dovecote.vmmgr.placement import Limits
from dovecote.vmmgr.pool import WarmPool
from dovecote.vmmgr.templates import TemplateFiles
from tests.capsules.fakes import AgentProcessDriver
from tests.capsules.vmmgr_harness import ANA, BOB, Events, open_capsules, wait_status


class PrestartDriver(AgentProcessDriver):
    supports_prestart = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[str, VmSpec] = {}
        self.restored: list[tuple[str, Path]] = []
        self.fail_finish = False

    async def prestart(self, spec: VmSpec) -> VmHandle:
        assert spec.incoming_state is not None
        self.waiting[spec.capsule_id] = spec
        return VmHandle(capsule_id=spec.capsule_id, name=f"dovecote-{spec.capsule_id}", accel=self.accel,
                        overlay_path=spec.overlay_path, agent_socket_path=spec.agent_socket_path,
                        console_log_path=spec.console_log_path)

    async def finish_restore(self, capsule_id: str, state: Path) -> None:
        spec = self.waiting.pop(capsule_id)
        if self.fail_finish:  # as the libvirt driver: the VM is destroyed
            raise DriverError("the pre-started QEMU is gone")
        self.restored.append((capsule_id, state))
        await self.create(spec)

    async def destroy(self, capsule_id: str, *, remove_disk: bool = True) -> None:
        if self.waiting.pop(capsule_id, None) is not None:
            self.destroyed.append(capsule_id)
            return
        await super().destroy(capsule_id, remove_disk=remove_disk)

    async def list(self) -> builtins.list[VmInfo]:
        paused = [VmInfo(handle=await self.prestart(spec), state=VmState.PAUSED)
                  for spec in list(self.waiting.values())]
        return await super().list() + paused


def _template(run_dir: Path) -> TemplateFiles:
    files = TemplateFiles(directory=run_dir / "template", vcpus=1, memory_mb=512)
    files.directory.mkdir(parents=True, exist_ok=True)
    files.state.write_bytes(b"state 1")
    return files


async def _with_pool(capsules: Capsules, nursery: trio.Nursery, *, prestarted: int = 1) -> WarmPool:
    pool = WarmPool(capsules, 0, disk_size_mb=m.CapsuleSpec().disk_size_mb, prestarted=prestarted)
    capsules.pool = pool
    await nursery.start(pool.run)
    return pool


async def _wait_prestarted(capsules: Capsules, n: int) -> None:
    with trio.fail_after(20):
        while capsules.statistics()["prestarted"] != n:  # noqa: ASYNC110 - a health figure
            await trio.sleep(0.02)


def _identity(run_dir: Path, capsule_id: str) -> tuple[str, str]:
    etc = run_dir / capsule_id / "etc"
    return (etc / "hostname").read_text().strip(), (etc / "machine-id").read_text().strip()


async def test_a_create_without_a_spare_claims_the_prestarted_vm(vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = PrestartDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules, \
                trio.open_nursery() as nursery:
            capsules.minimal = files = _template(run_dir)
            await _with_pool(capsules, nursery)
            await _wait_prestarted(capsules, 1)
            (waiting,) = driver.waiting
            assert waiting in capsules.pool and capsules.statistics()["spares"] == 0

            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            assert created.capsule.id == waiting and created.capsule.status == "starting"
            await wait_status(capsules, waiting, "running")
            assert driver.restored == [(waiting, files.state)]
            assert events.statuses(waiting) == [(None, "starting"), ("starting", "running")]
            hostname, machine_id = _identity(run_dir, waiting)
            assert hostname == waiting and len(machine_id) == 32
            assert capsules.statistics()["prestarted_claims"] == 1
            await _wait_prestarted(capsules, 1)  # another one waits
            assert waiting not in driver.waiting

            # A shape the template does not have restores as usual: nothing claimed.
            other = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec(memory_mb=1024)))
            assert other.capsule.id not in driver.waiting
            assert capsules.statistics()["prestarted_claims"] == 1
            nursery.cancel_scope.cancel()
    finally:
        driver.kill_all()


async def test_a_prestarted_vm_of_a_changed_template_is_destroyed_not_claimed(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = PrestartDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules, \
                trio.open_nursery() as nursery:
            capsules.minimal = files = _template(run_dir)
            await _with_pool(capsules, nursery)
            await _wait_prestarted(capsules, 1)
            (old,) = driver.waiting
            tmp = files.state.with_suffix(".new")  # the template rebuilt: a new state file
            tmp.write_bytes(b"state 2")
            os.replace(tmp, files.state)

            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            assert created.capsule.id != old
            with trio.fail_after(20):
                while old not in driver.destroyed:  # noqa: ASYNC110 - the fake's record
                    await trio.sleep(0.02)
            assert capsules.statistics()["prestarted_claims"] == 0
            await _wait_prestarted(capsules, 1)  # one for the new template
            (new,) = driver.waiting
            claimed = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            assert claimed.capsule.id == new
            await wait_status(capsules, new, "running")
            assert capsules.statistics()["prestarted_claims"] == 1
            nursery.cancel_scope.cancel()
    finally:
        driver.kill_all()


async def test_a_prestarted_vm_that_cannot_take_the_state_is_restored_anew(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = PrestartDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules, \
                trio.open_nursery() as nursery:
            capsules.minimal = _template(run_dir)
            await _with_pool(capsules, nursery)
            await _wait_prestarted(capsules, 1)
            (waiting,) = driver.waiting
            driver.fail_finish = True
            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            assert created.capsule.id == waiting
            await wait_status(capsules, waiting, "running")  # the template restored the whole way
            assert driver.restored == [] and _identity(run_dir, waiting)[0] == waiting
            nursery.cancel_scope.cancel()
    finally:
        driver.kill_all()


async def test_a_refused_create_does_not_keep_its_prestarted_vm(vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = PrestartDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events,
                                 limits=Limits(team_max_capsules=1)) as capsules, \
                trio.open_nursery() as nursery:
            capsules.minimal = _template(run_dir)
            await _with_pool(capsules, nursery)
            first = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            await wait_status(capsules, first.capsule.id, "running")
            await _wait_prestarted(capsules, 1)
            (waiting,) = driver.waiting
            with pytest.raises(ServiceError) as caught:  # Ana is at her cap
                await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            assert caught.value.status in (403, 409, 429), caught.value
            # Its state was loaded and its guest ran: destroyed, never handed to another create.
            with trio.fail_after(20):
                while waiting not in driver.destroyed:  # noqa: ASYNC110 - the fake's record
                    await trio.sleep(0.02)
            assert waiting not in capsules.busy()
            await _wait_prestarted(capsules, 1)
            (fresh,) = driver.waiting
            claims = capsules.statistics()["prestarted_claims"]
            other = await capsules.create(m.CreateCapsule(actor=BOB, spec=m.CapsuleSpec()))
            assert other.capsule.id == fresh != waiting
            await wait_status(capsules, fresh, "running", actor=BOB)
            assert capsules.statistics()["prestarted_claims"] == claims + 1
            nursery.cancel_scope.cancel()
    finally:
        driver.kill_all()


async def test_a_driver_that_cannot_prestart_gets_none(vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules, \
                trio.open_nursery() as nursery:
            capsules.minimal = _template(run_dir)
            await _with_pool(capsules, nursery)
            await trio.sleep(0.5)
            assert capsules.statistics()["prestarted"] == 0
            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            await wait_status(capsules, created.capsule.id, "running")
            assert capsules.statistics()["prestarted_claims"] == 0
            nursery.cancel_scope.cancel()
    finally:
        driver.kill_all()
