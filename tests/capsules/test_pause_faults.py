"""Pause and resume when the hypervisor fails: nothing is lost, the capsule stays usable.

The driver is the fake of ``fakes.py`` (a guest agent process per "VM") with
faults injected in save and restore; the database and the state machine are
real. Successful pause/resume on real VMs: ``test_snapshots_vm.py``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import trio

from dovecote.bus.messages import capsules as m
from dovecote.bus.messages import events as ev
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from dovecote.vmmgr.snapshots import Snapshots
from tests.capsules.fakes import AgentProcessDriver
from tests.capsules.vmmgr_harness import ANA, BOB, Events, open_capsules, wait_status


async def test_a_failed_pause_leaves_the_capsule_running_and_a_failed_resume_leaves_it_paused(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules:
            snapshots = Snapshots(capsules)
            capsule_id = (await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))).capsule.id
            await wait_status(capsules, capsule_id, "running")

            # The save fails: back to running, still executing commands.
            driver.fail_save = True
            reply = await snapshots.pause(m.PauseCapsule(actor=ANA, capsule_id=capsule_id))
            assert reply.capsule.status == "pausing"
            await wait_status(capsules, capsule_id, "running")
            with trio.fail_after(5):  # the event follows the record
                while ("pausing", "running") not in events.statuses(capsule_id):  # noqa: ASYNC110
                    await trio.sleep(0.02)
            done = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id, cmd="echo alive"))
            assert done.result is not None and done.result.stdout == "alive\n"

            # Another team cannot pause it; a running capsule cannot be resumed twice.
            try:
                await snapshots.pause(m.PauseCapsule(actor=BOB, capsule_id=capsule_id))
                raise AssertionError("another team paused the capsule")
            except ServiceError as exc:
                assert exc.status == 404

            driver.fail_save = False
            await snapshots.pause(m.PauseCapsule(actor=ANA, capsule_id=capsule_id))
            await wait_status(capsules, capsule_id, "paused")
            try:
                await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id, cmd="true"))
                raise AssertionError("a paused capsule ran a command")
            except ServiceError as exc:
                assert (exc.status, exc.code) == (409, "not_running")

            # The restore fails: still paused, the error recorded, the saved state kept.
            driver.fail_restore = True
            await snapshots.resume(m.ResumeCapsule(actor=ANA, capsule_id=capsule_id))
            with trio.fail_after(20):
                while True:
                    row = await vmmgr_db.fetchone("SELECT status, error FROM capsules WHERE id = %s",
                                                  (capsule_id,))
                    assert row is not None
                    if row["status"] == "paused" and row["error"]:
                        break
                    await trio.sleep(0.05)
            assert "restore refused" in row["error"]
            assert (capsules.capsule_dir(capsule_id) / "memory.sav").exists()

            # It resumes once the hypervisor works again; the error is cleared.
            driver.fail_restore = False
            await snapshots.resume(m.ResumeCapsule(actor=ANA, capsule_id=capsule_id))
            await wait_status(capsules, capsule_id, "running")
            row = await vmmgr_db.fetchone("SELECT error FROM capsules WHERE id = %s", (capsule_id,))
            assert row is not None and row["error"] is None
            done = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id, cmd="echo back"))
            assert done.result is not None and done.result.stdout == "back\n"
            assert not (capsules.capsule_dir(capsule_id) / "memory.sav").exists()
    finally:
        driver.kill_all()


async def test_an_idle_capsule_is_paused_with_reason_ttl_expired_and_an_active_one_is_not(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    recorded: list[ev.RecordEvent] = []
    paused_event = trio.Event()

    async def request(service: str, message: object, **_: object) -> object:
        """The notifier's side of the bus (a seam: the real one is tested in tests/events)."""
        assert service == "notifier" and isinstance(message, ev.RecordEvents)
        for item in message.events:
            recorded.append(item)
            if item.event.event == "capsule.pause":
                paused_event.set()
        return ev.EventsRecorded(ids=list(range(len(recorded) - len(message.events) + 1, len(recorded) + 1)))

    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules:
            capsules.request = request
            snapshots = Snapshots(capsules)
            ids = []
            for _ in range(2):
                created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec(timeout_sec=5)))
                assert created.capsule.timeout_sec == 60  # clamped
                ids.append(created.capsule.id)
            for capsule_id in ids:
                await wait_status(capsules, capsule_id, "running")
            # The first was last active two minutes ago; the second was just pinged.
            await vmmgr_db.execute("UPDATE capsules SET last_active_at = now() - interval '2 minutes' "
                                   "WHERE id = %s", (ids[0],))
            await capsules.ping(m.PingCapsule(actor=ANA, capsule_id=ids[1]))
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(snapshots.watch_ttl, interval_s=0.1))
                await wait_status(capsules, ids[0], "paused")
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
            other = await capsules.lookup(m.LookupCapsule(actor=ANA, capsule_id=ids[1]))
            assert other.capsule.status == "running"
            with trio.fail_after(5):
                await paused_event.wait()
            (pause,) = [r for r in recorded if r.event.event == "capsule.pause"]
            assert pause.team_id == ANA.team_id and pause.event.outcome == "success"
            assert pause.event.metadata["reason"] == "ttl_expired" and pause.event.actor.type == "system"
            assert pause.event.sandbox is not None and pause.event.sandbox.id == ids[0]
            assert pause.event.sandbox.status == "paused"
    finally:
        driver.kill_all()


async def test_a_deleted_teams_templates_are_removed_with_their_files(
        vmmgr_db: Database, run_dir: Path) -> None:
    from types import SimpleNamespace

    from dovecote.bus.messages.auth_teams import TeamDeleted
    from dovecote.bus.messages.common import Principal
    from dovecote.vmmgr.capsules import Capsules, CapsuleSettings, Machines
    from dovecote.vmmgr.hostlink import HostLink

    async with trio.open_nursery() as nursery:
        capsules = Capsules(db=vmmgr_db, publish=Events().publish, machines=Machines(), nursery=nursery,
                            settings=CapsuleSettings(host_id="h1", run_dir=run_dir,
                                                     template_dir=run_dir / "templates"))
        for template_id, team in (("tpl-gone", "team-gone"), ("tpl-kept", "team-kept")):
            await vmmgr_db.execute(
                "INSERT INTO templates (id, team_id, name, host_id, status, vcpus, memory_mb, disk_size_mb) "
                "VALUES (%s, %s, 'snap', 'h1', 'ready', 1, 512, 5120)", (template_id, team))
            await trio.Path(run_dir / "templates" / template_id).mkdir(parents=True)
        ctx = SimpleNamespace(config=SimpleNamespace(host_id="h1"))
        link = HostLink(ctx, capsules)  # type: ignore[arg-type]
        await link._on_event(TeamDeleted(team_id="team-gone", deleted_at="2026-11-22T00:00:00Z",
                                         actor=Principal(auth_type="session", user_id="usr-owner")))
        left = await vmmgr_db.fetchall("SELECT id FROM templates WHERE id IN ('tpl-gone', 'tpl-kept')")
        assert [r["id"] for r in left] == ["tpl-kept"]
        assert not await trio.Path(run_dir / "templates" / "tpl-gone").exists()
        assert await trio.Path(run_dir / "templates" / "tpl-kept").exists()
        nursery.cancel_scope.cancel()
