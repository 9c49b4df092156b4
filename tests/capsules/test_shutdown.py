"""vmmgr's stop pauses its running capsules, its next start resumes exactly those.

``plan_stop`` is tested as a table (no I/O); the stop and start themselves run
on the fake driver of ``fakes.py`` (a guest agent process per "VM") with the
real database and state machine. On real VMs, through ``dovecote up`` and
Ctrl-C: ``test_shutdown_vm.py``.
"""

from __future__ import annotations

from pathlib import Path

import trio

from dovecote.bus.messages import capsules as m
from dovecote.libs.db import Database
from dovecote.vmmgr.capsule_store import SHUTDOWN_PAUSE
from dovecote.vmmgr.shutdown import pause_for_shutdown, plan_stop, resume_after_shutdown
from dovecote.vmmgr.snapshots import Snapshots
from tests.capsules.fakes import AgentProcessDriver
from tests.capsules.vmmgr_harness import ANA, Events, open_capsules, wait_status


def test_each_status_has_one_decision_and_a_failed_pause_is_not_retried() -> None:
    rows = [{"id": s, "status": s} for s in (
        "running", "starting", "pausing", "resuming", "stopping", "paused", "stopped", "error",
        "missing")]
    rows.append({"id": "tried", "status": "running"})
    todo = plan_stop(rows, tried={"tried"})
    assert todo.pause == ["running"]
    assert todo.wait == ["starting", "pausing", "resuming", "stopping"]
    assert not todo.done
    assert plan_stop([{"id": "a", "status": "paused"}, {"id": "b", "status": "running"}], {"b"}).done


async def _reason(db: Database, capsule_id: str) -> str | None:
    return await db.fetchval("SELECT pause_reason FROM capsules WHERE id = %s", (capsule_id,))


async def test_stop_pauses_running_and_booting_capsules_and_start_resumes_only_those(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules:
            snapshots = Snapshots(capsules)

            async def create() -> str:
                return (await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))).capsule.id

            running, napping = await create(), await create()
            for capsule_id in (running, napping):
                await wait_status(capsules, capsule_id, "running")
            await snapshots.pause(m.PauseCapsule(actor=ANA, capsule_id=napping))
            await wait_status(capsules, napping, "paused")
            booting = await create()  # still starting: the stop waits for it, then pauses it

            with trio.fail_after(30):
                report = await pause_for_shutdown(capsules, snapshots, timeout_s=30)
            assert sorted(report.paused) == sorted([running, booting])
            assert report.failed == [] and report.left == []
            assert not driver.procs  # nothing runs
            for capsule_id in (running, booting):
                assert (await wait_status(capsules, capsule_id, "paused")).status == "paused"
                assert await _reason(vmmgr_db, capsule_id) == SHUTDOWN_PAUSE
            assert await _reason(vmmgr_db, napping) == "user"

            with trio.fail_after(30):
                resumed = await resume_after_shutdown(capsules, snapshots)
            assert sorted(resumed) == sorted([running, booting])
            for capsule_id in (running, booting):
                await wait_status(capsules, capsule_id, "running")
                done = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id, cmd="echo up"))
                assert done.result is not None and done.result.stdout == "up\n"
            assert (await wait_status(capsules, napping, "paused")).status == "paused"
            # Nothing left to resume: a second start resumes nothing.
            assert await resume_after_shutdown(capsules, snapshots) == []
    finally:
        driver.kill_all()


async def test_a_capsule_whose_pause_fails_keeps_running_and_the_stop_ends(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules:
            snapshots = Snapshots(capsules)
            capsule_id = (await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))).capsule.id
            await wait_status(capsules, capsule_id, "running")
            driver.fail_save = True
            with trio.fail_after(10):  # not retried until the 60 s budget runs out
                report = await pause_for_shutdown(capsules, snapshots, timeout_s=60)
            assert report.failed == [capsule_id] and report.paused == []
            await wait_status(capsules, capsule_id, "running")
            assert await resume_after_shutdown(capsules, snapshots) == []
    finally:
        driver.kill_all()
