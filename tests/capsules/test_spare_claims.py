"""Claiming a warm spare (``vmmgr/pool.py``, ``vmmgr/lifecycle.py``): the create takes the
spare's id, pushes a fresh identity before ``running``, and a refused create gives the spare
back for the next one.

The hypervisor is :class:`~tests.capsules.fakes.AgentProcessDriver` (the real guest agent
in a host process, writing its hostname and machine id under the capsule's ``etc/``); the
database is real. What the pool holds is read from :meth:`Capsules.statistics` (what
vmmgr's health shows). The same claim on real VMs is in ``test_team_spares_vm.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from dovecote.bus.messages import capsules as m
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.placement import Limits
from dovecote.vmmgr.pool import WarmPool
from dovecote.vmmgr.templates import TemplateFiles
from tests.capsules.fakes import AgentProcessDriver
from tests.capsules.vmmgr_harness import ANA, BOB, Events, open_capsules, wait_status


async def _with_pool(capsules: Capsules, run_dir: Path, nursery: trio.Nursery) -> WarmPool:
    capsules.minimal = TemplateFiles(directory=run_dir / "template", vcpus=1, memory_mb=512)
    pool = WarmPool(capsules, 1, disk_size_mb=m.CapsuleSpec().disk_size_mb)
    capsules.pool = pool
    await nursery.start(pool.run)
    await _wait_spares(capsules, 1)
    return pool


async def _wait_spares(capsules: Capsules, n: int) -> None:
    with trio.fail_after(20):
        while capsules.statistics()["spares"] != n:  # noqa: ASYNC110 - a health figure, no event
            await trio.sleep(0.02)


def _spare_ids(run_dir: Path, records: set[str]) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.name.startswith("cap-") and p.name not in records}


def _identity(run_dir: Path, capsule_id: str) -> tuple[str, str]:
    etc = run_dir / capsule_id / "etc"
    return (etc / "hostname").read_text().strip(), (etc / "machine-id").read_text().strip()


async def test_a_create_claims_the_spare_and_pushes_a_fresh_identity_before_running(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules, \
                trio.open_nursery() as nursery:
            await _with_pool(capsules, run_dir, nursery)
            (spare,) = _spare_ids(run_dir, set())
            warmed = _identity(run_dir, spare)  # the spare's throwaway identity
            assert warmed[0] == spare

            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            assert created.capsule.id == spare and created.capsule.status == "starting"
            running = await wait_status(capsules, spare, "running")
            assert events.statuses(spare) == [(None, "starting"), ("starting", "running")]
            hostname, machine_id = _identity(run_dir, spare)
            assert hostname == spare and len(machine_id) == 32 and machine_id != warmed[1]
            assert running.disk_used_mb is not None and running.metadata
            assert "agent_version" in running.metadata
            assert capsules.statistics()["spare_claims"] == 1
            await _wait_spares(capsules, 1)  # refilled
            nursery.cancel_scope.cancel()
    finally:
        driver.kill_all()


async def test_a_refused_create_gives_its_spare_back_to_the_next_create(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events,
                                 limits=Limits(team_max_capsules=1)) as capsules, \
                trio.open_nursery() as nursery:
            await _with_pool(capsules, run_dir, nursery)
            first = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            await wait_status(capsules, first.capsule.id, "running")
            await _wait_spares(capsules, 1)
            (spare,) = _spare_ids(run_dir, {first.capsule.id})

            with pytest.raises(ServiceError) as caught:  # Ana is at her cap
                await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            assert caught.value.status in (403, 409, 429), caught.value
            await _wait_spares(capsules, 1)  # given back (after its identity push)
            assert spare not in capsules.busy()

            other = await capsules.create(m.CreateCapsule(actor=BOB, spec=m.CapsuleSpec()))
            assert other.capsule.id == spare
            await wait_status(capsules, spare, "running", actor=BOB)
            assert _identity(run_dir, spare)[0] == spare
            assert events.statuses(spare) == [(None, "starting"), ("starting", "running")]
            nursery.cancel_scope.cancel()
    finally:
        driver.kill_all()
