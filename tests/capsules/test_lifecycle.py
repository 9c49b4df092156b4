"""The capsule state machine, caps, reconcile and agent operations of vmmgr.

The hypervisor is :class:`~tests.capsules.fakes.AgentProcessDriver` (the real
guest agent in a host process): everything else is real, the database
included. The same flows on a real QEMU VM are in ``test_capsules_vm.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from dovecote.bus.messages import capsules as m
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from dovecote.vmmgr.capsules import Capsules, CapsuleSettings, Machines
from dovecote.vmmgr.placement import Limits
from dovecote.vmmgr.reconcile import reconcile
from tests.capsules.fakes import AgentProcessDriver, fake_image
from tests.capsules.vmmgr_harness import ADMIN, ANA, BOB, Events, open_capsules, wait_status


async def test_a_capsule_starts_runs_commands_and_stops_publishing_each_change(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules:
            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec(
                metadata={"purpose": "test"})))
            capsule_id = created.capsule.id
            assert created.capsule.status == "starting" and created.host_id == "h1"
            running = await wait_status(capsules, capsule_id, "running")
            assert running.started_at and running.metadata
            assert running.metadata["purpose"] == "test" and "agent_version" in running.metadata

            reply = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id,
                                                      cmd="echo hello"))
            assert reply.result is not None
            assert (reply.result.stdout, reply.result.exit_code) == ("hello\n", 0)
            argv = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id, cmd="printf",
                                                     args=["%s-%s", "a", "b"]))
            assert argv.result is not None and argv.result.stdout == "a-b"

            started = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id,
                                                        cmd="sleep 300", background=True, tag="nap"))
            assert started.started is not None and started.started.tag == "nap"
            listed = await capsules.list_processes(m.ListProcesses(actor=ANA, capsule_id=capsule_id))
            assert "nap" in [p.tag for p in listed.body.processes]
            await capsules.kill_process(m.KillProcess(actor=ANA, capsule_id=capsule_id, selector="nap"))
            with pytest.raises(ServiceError) as caught:
                await capsules.kill_process(m.KillProcess(actor=ANA, capsule_id=capsule_id,
                                                          selector="nope"))
            assert caught.value.status == 404

            # Another team sees nothing; an admin sees it only through admin routes.
            for call in (capsules.lookup(m.LookupCapsule(actor=BOB, capsule_id=capsule_id)),
                         capsules.exec(m.ExecCommand(actor=BOB, capsule_id=capsule_id, cmd="id"))):
                with pytest.raises(ServiceError) as caught:
                    await call
                assert (caught.value.status, caught.value.code) == (404, "not_found")
            assert (await capsules.lookup(m.LookupCapsule(actor=ADMIN, capsule_id=capsule_id,
                                                          admin=True))).capsule.id == capsule_id
            with pytest.raises(ServiceError) as caught:
                await capsules.lookup(m.LookupCapsule(actor=BOB, capsule_id=capsule_id, admin=True))
            assert caught.value.status == 403

            stopping = await capsules.destroy(m.DestroyCapsule(actor=ANA, capsule_id=capsule_id))
            assert stopping.capsule.status == "stopping"
            await wait_status(capsules, capsule_id, "stopped")
            assert capsule_id in driver.destroyed
            assert not (run_dir / capsule_id).exists()
            with pytest.raises(ServiceError) as caught:
                await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=capsule_id, cmd="true"))
            assert (caught.value.status, caught.value.code) == (409, "not_running")
            assert events.statuses(capsule_id) == [
                (None, "starting"), ("starting", "running"), ("running", "stopping"),
                ("stopping", "stopped")]
            assert {t for t, _ in events.seen} == {m.CAPSULE_STATE_TOPIC}
            assert all(e.team_id == "team-a" for _, e in events.seen)
    finally:
        driver.kill_all()


async def test_files_write_read_list_mkdir_remove(vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules:
            cid = (await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))).capsule.id
            await wait_status(capsules, cid, "running")
            base = str(run_dir / "files")
            made = await capsules.make_dir(m.MakeDir(actor=ANA, capsule_id=cid, path=base))
            assert made.body.entry.type == "directory"
            with pytest.raises(ServiceError) as caught:
                await capsules.make_dir(m.MakeDir(actor=ANA, capsule_id=cid, path=base))
            assert (caught.value.status, caught.value.code) == (409, "already_exists")
            await capsules.write_file(m.WriteFile(actor=ANA, capsule_id=cid, path=base + "/a.txt",
                                                  data=b"hi\x00there"))
            read = await capsules.read_file(m.ReadFile(actor=ANA, capsule_id=cid, path=base + "/a.txt"))
            assert read.data == b"hi\x00there"
            listing = await capsules.list_dir(m.ListDir(actor=ANA, capsule_id=cid, path=base))
            assert [(e.name, e.type, e.size) for e in listing.body.entries] == [("a.txt", "file", 8)]
            await capsules.remove_path(m.RemovePath(actor=ANA, capsule_id=cid, path=base))
            with pytest.raises(ServiceError) as caught:
                await capsules.read_file(m.ReadFile(actor=ANA, capsule_id=cid, path=base + "/a.txt"))
            assert caught.value.status == 404
            with pytest.raises(ServiceError) as caught:
                await capsules.read_file(m.ReadFile(actor=ANA, capsule_id=cid, path="relative"))
            assert caught.value.status == 400
    finally:
        driver.kill_all()


async def test_team_caps_refuse_with_429_and_a_failed_boot_is_error(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(fail_create=True), Events()
    limits = Limits(team_max_capsules=1)
    async with open_capsules(vmmgr_db, driver, run_dir, events, limits) as capsules:
        first = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
        with pytest.raises(ServiceError) as caught:
            await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
        assert (caught.value.status, caught.value.code) == (429, "quota_capsules")
        await capsules.create(m.CreateCapsule(actor=BOB, spec=m.CapsuleSpec()))  # another team's cap
        failed = await wait_status(capsules, first.capsule.id, "error")
        assert failed.status == "error"
        row = await vmmgr_db.fetchone("SELECT error FROM capsules WHERE id = %s", (first.capsule.id,))
        assert row is not None and "the hypervisor said no" in row["error"]
        # An errored capsule no longer counts against the cap.
        await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))


async def test_creates_wait_for_the_image_with_503(vmmgr_db: Database, run_dir: Path) -> None:
    async with trio.open_nursery() as nursery:
        capsules = Capsules(db=vmmgr_db, publish=Events().publish, machines=Machines(),
                            nursery=nursery, settings=CapsuleSettings(host_id="h1", run_dir=run_dir))
        with pytest.raises(ServiceError) as caught:
            await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
        assert (caught.value.status, caught.value.code) == (503, "image_not_ready")


async def test_reconcile_after_a_restart_keeps_running_vms_and_fixes_the_rest(
        vmmgr_db: Database, run_dir: Path) -> None:
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules:
            keep = (await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))).capsule.id
            lost = (await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))).capsule.id
            await wait_status(capsules, keep, "running")
            await wait_status(capsules, lost, "running")
            await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=keep, cmd="sleep 300",
                                              background=True, tag="survivor"))
        # vmmgr is gone (its agent connections closed); meanwhile one VM died and
        # an orphan VM appeared.
        proc, _ = driver.procs.pop(lost)
        proc.kill()
        proc.wait()
        orphan = m.CapsuleSpec()
        from dovecote.vmmgr.driver import VmSpec

        (run_dir / "cap-orphan").mkdir()
        await driver.create(VmSpec.in_dir("cap-orphan", run_dir / "cap-orphan",
                                          image=fake_image(run_dir), vcpus=orphan.vcpus))
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules:
            plan = await reconcile(capsules)
            assert plan.keep == [keep] and plan.destroy_orphans == ["cap-orphan"]
            assert plan.mark_missing == [lost]
            assert (await capsules.lookup(m.LookupCapsule(actor=ANA, capsule_id=lost))).capsule.status \
                == "missing"
            reply = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=keep, cmd="echo still here"))
            assert reply.result is not None and reply.result.stdout == "still here\n"
            processes = await capsules.list_processes(m.ListProcesses(actor=ANA, capsule_id=keep))
            assert "survivor" in [p.tag for p in processes.body.processes]
    finally:
        driver.kill_all()


async def test_a_reconcile_while_serving_leaves_a_create_in_flight_alone(
        vmmgr_db: Database, run_dir: Path) -> None:
    """A host back online reconciles while it serves: a create whose record is written but
    whose boot has not started yet (its VM does not exist) is not ``missing``."""
    driver, events = AgentProcessDriver(), Events()
    try:
        async with open_capsules(vmmgr_db, driver, run_dir, events) as capsules:
            lifecycle = capsules.lifecycle
            announce = lifecycle.events.announce
            plans = []

            async def announce_then_reconcile(row, old):  # type: ignore[no-untyped-def]
                await announce(row, old)
                if old is None:  # the record exists, the boot is not started: reconcile now
                    plans.append(await reconcile(capsules))

            lifecycle.events.announce = announce_then_reconcile  # type: ignore[method-assign]
            created = await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))
            capsule_id = created.capsule.id
            assert plans and capsule_id not in plans[0].mark_missing, plans
            lifecycle.events.announce = announce  # type: ignore[method-assign]
            running = await wait_status(capsules, capsule_id, "running")
            assert running.status == "running"
    finally:
        driver.kill_all()
