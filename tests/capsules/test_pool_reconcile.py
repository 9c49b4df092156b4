"""A reconcile that runs while the warm pool makes a spare (``vmmgr/reconcile.py``,
``vmmgr/pool.py``): the spare's VM is already listed by the driver but not yet held by
the pool, and it has no record on purpose; reconcile must leave it to the pool, which
then hands it to a create as usual. A VM of nobody's under the same run directory is
still destroyed by that reconcile (so the test sees reconcile judge at all).

The hypervisor is :class:`~tests.capsules.test_prestarted.PrestartDriver` (the real guest
agent in a host process, with pre-starting) held at a gate right after the VM exists, as a
``createXML`` that has returned while the pool still waits for the agent. The database is
real. A reconcile runs while vmmgr serves when its host comes back online
(:mod:`dovecote.vmmgr.hostlink`).
"""

from __future__ import annotations

from pathlib import Path

import trio

from dovecote.bus.messages import capsules as m
from dovecote.libs.db import Database
from dovecote.vmmgr.capsules import Capsules, new_capsule_id
from dovecote.vmmgr.driver import VmHandle, VmSpec
from dovecote.vmmgr.pool import WarmPool
from dovecote.vmmgr.reconcile import reconcile
from dovecote.vmmgr.templates import TemplateFiles
from tests.capsules.test_prestarted import PrestartDriver
from tests.capsules.vmmgr_harness import ANA, Events, open_capsules, wait_status


class GatedDriver(PrestartDriver):
    """Once :attr:`gated`, a create or pre-start makes its VM, then waits at the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gated = False
        self.held = trio.Event()
        """A VM exists whose create or pre-start has not returned."""
        self._gate = trio.Event()

    def release(self) -> None:
        self.gated = False
        self._gate.set()

    async def _hold(self) -> None:
        if self.gated:
            self.held.set()
            with trio.fail_after(30):
                await self._gate.wait()

    async def create(self, spec: VmSpec) -> VmHandle:
        handle = await super().create(spec)
        await self._hold()
        return handle

    async def prestart(self, spec: VmSpec) -> VmHandle:
        fresh = spec.capsule_id not in self.waiting  # PrestartDriver.list calls it for a handle
        handle = await super().prestart(spec)
        if fresh:
            await self._hold()
        return handle


def _template(run_dir: Path) -> TemplateFiles:
    files = TemplateFiles(directory=run_dir / "template", vcpus=1, memory_mb=512)
    files.directory.mkdir(parents=True, exist_ok=True)
    files.state.write_bytes(b"state 1")
    return files


async def _orphan(capsules: Capsules, driver: GatedDriver) -> str:
    """A VM under this vmmgr's run directory that no record and no pool owns."""
    capsule_id = new_capsule_id()
    await driver.create(await capsules.vm_spec(capsule_id, vcpus=1, memory_mb=512,
                                               disk_size_mb=m.CapsuleSpec().disk_size_mb))
    return capsule_id


async def _wait_statistic(capsules: Capsules, name: str, n: int) -> None:
    with trio.fail_after(20):
        while capsules.statistics()[name] != n:  # noqa: ASYNC110 - a health figure, no event
            await trio.sleep(0.02)


async def test_a_reconcile_while_a_spare_is_made_leaves_it_to_the_pool(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = GatedDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules, \
                trio.open_nursery() as nursery:
            capsules.minimal = _template(run_dir)
            orphan = await _orphan(capsules, driver)
            driver.gated = True
            capsules.pool = WarmPool(capsules, 1, disk_size_mb=m.CapsuleSpec().disk_size_mb)
            await nursery.start(capsules.pool.run)
            with trio.fail_after(20):
                await driver.held.wait()
            (spare,) = set(driver.procs) - {orphan}  # its VM runs; the pool does not hold it yet
            assert capsules.statistics()["spares"] == 0

            todo = await reconcile(capsules)
            assert todo.destroy_orphans == [orphan]
            assert orphan in driver.destroyed and spare not in driver.destroyed
            assert (run_dir / spare).is_dir()

            driver.release()
            await _wait_statistic(capsules, "spares", 1)
            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            assert created.capsule.id == spare
            await wait_status(capsules, spare, "running")
            assert capsules.statistics()["spare_claims"] == 1 and spare not in driver.destroyed
            nursery.cancel_scope.cancel()
    finally:
        driver.kill_all()


async def test_a_reconcile_while_a_vm_is_prestarted_leaves_it_to_the_pool(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = GatedDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules, \
                trio.open_nursery() as nursery:
            capsules.minimal = files = _template(run_dir)
            orphan = await _orphan(capsules, driver)
            driver.gated = True
            capsules.pool = WarmPool(capsules, 0, disk_size_mb=m.CapsuleSpec().disk_size_mb,
                                     prestarted=1)
            await nursery.start(capsules.pool.run)
            with trio.fail_after(20):
                await driver.held.wait()
            (waiting,) = driver.waiting  # QEMU started, waiting; the pool does not hold it yet
            assert capsules.statistics()["prestarted"] == 0

            todo = await reconcile(capsules)
            assert todo.destroy_orphans == [orphan]
            assert waiting not in driver.destroyed and waiting in driver.waiting
            assert (run_dir / waiting).is_dir()

            driver.release()
            await _wait_statistic(capsules, "prestarted", 1)
            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            assert created.capsule.id == waiting
            await wait_status(capsules, waiting, "running")
            assert driver.restored == [(waiting, files.state)]
            assert capsules.statistics()["prestarted_claims"] == 1
            nursery.cancel_scope.cancel()
    finally:
        driver.kill_all()
