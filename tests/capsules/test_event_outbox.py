"""vmmgr's lifecycle events go through its outbox: none lost, none doubled, order kept.

The capsule handlers run on the fake driver with the real database; the
notifier is a seam of the bus (:class:`Notifier`: it appends a key once, like
the real one, which ``tests/events/test_event_keys.py`` shows), that can be
down or lose its reply after appending. Under real kills:
``tests/suite/test_faults.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from dovecote.bus.errors import BusTimeout, RemoteError
from dovecote.bus.messages import capsules as m
from dovecote.bus.messages import events as ev
from dovecote.libs.db import Database
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.reconcile import reconcile
from dovecote.vmmgr.snapshots import Snapshots
from tests.capsules.fakes import AgentProcessDriver
from tests.capsules.vmmgr_harness import ANA, Events, open_capsules, wait_status


class Notifier:
    """The notifier's side of the bus: an event log that appends each key once."""

    def __init__(self) -> None:
        self.log: list[ev.RecordEvent] = []
        self.ids: dict[str, int] = {}
        self.down = False
        self.lose_replies = 0
        """Replies lost after the append (a notifier killed between its commit and its reply)."""

    async def request(self, service: str, message: Any, **_: Any) -> Any:
        assert service == "notifier" and isinstance(message, ev.RecordEvents)
        await trio.lowlevel.checkpoint()
        if self.down:
            raise BusTimeout("the notifier did not answer")
        ids = []
        for item in message.events:
            assert item.key, "every outbox event carries its key"
            if item.key not in self.ids:
                self.log.append(item)
                self.ids[item.key] = len(self.log)
            ids.append(self.ids[item.key])
        if self.lose_replies:
            self.lose_replies -= 1
            raise RemoteError("worker_lost", "the notifier went away")
        return ev.EventsRecorded(ids=ids)

    def about(self, capsule_id: str) -> list[tuple[str, str | None, str | None]]:
        """``(event, outcome, new status)`` of the capsule's logged events, in log order."""
        return [(i.event.event, i.event.outcome, i.event.metadata.get("to"))
                for i in self.log if i.event.resource.id == capsule_id]


async def outbox_rows(db: Database) -> int:
    return int(await db.fetchval("SELECT count(*) FROM event_outbox"))


async def until_sent(db: Database) -> None:
    with trio.fail_after(20):
        while await outbox_rows(db):  # noqa: ASYNC110 (the database is polled)
            await trio.sleep(0.05)


async def create_running(capsules: Capsules) -> str:
    capsule_id = (await capsules.create(m.CreateCapsule(actor=ANA, spec=m.CapsuleSpec()))).capsule.id
    await wait_status(capsules, capsule_id, "running")
    return capsule_id


class Host:
    """The fake driver's VMs, the real database and the notifier seam, outliving the vmmgr
    processes that :meth:`vmmgr` opens one after another (a restart)."""

    def __init__(self, db: Database, run_dir: Path) -> None:
        self.db, self.run_dir = db, run_dir
        self.driver, self.events, self.notifier = AgentProcessDriver(), Events(), Notifier()

    @asynccontextmanager
    async def vmmgr(self) -> AsyncIterator[Capsules]:
        """One vmmgr's capsule handlers, its lifecycle events sent to :attr:`notifier`."""
        async with open_capsules(self.db, self.driver, self.run_dir, self.events) as capsules:
            capsules.request = self.notifier.request
            yield capsules


@pytest.fixture
def host(vmmgr_db: Database, run_dir: Path) -> Iterator[Host]:
    host = Host(vmmgr_db, run_dir)
    try:
        yield host
    finally:
        host.driver.kill_all()


async def test_events_wait_while_the_notifier_is_down_and_are_logged_once_each_in_order(host: Host) -> None:
    notifier = host.notifier
    notifier.down = True
    async with host.vmmgr() as capsules:
        capsule_id = await create_running(capsules)
        await capsules.destroy(m.DestroyCapsule(actor=ANA, capsule_id=capsule_id))
        await wait_status(capsules, capsule_id, "stopped")
        assert notifier.log == [] and await outbox_rows(host.db) >= 4
        # Back, but its first reply is lost after the append: the retry doubles nothing.
        notifier.down, notifier.lose_replies = False, 1
        await until_sent(host.db)
        changes = [("capsule.state.changed", None, new) for old, new in host.events.statuses(capsule_id)
                   if old is not None]
        assert notifier.about(capsule_id) == [
            ("capsule.create", "success", None), *changes,
            ("capsule.destroy", "success", None)]
        assert [new for _, _, new in changes][-2:] == ["stopping", "stopped"]
        (create,) = [i for i in notifier.log if i.event.event == "capsule.create"]
        assert create.team_id == ANA.team_id and create.event.actor.type == "api_key"
        assert create.event.sandbox is not None and create.event.sandbox.status == "starting"


async def test_events_a_stopped_vmmgr_did_not_send_are_sent_by_the_next(host: Host) -> None:
    notifier = host.notifier
    notifier.down = True
    async with host.vmmgr() as capsules:
        capsule_id = await create_running(capsules)
    # That vmmgr is gone; its events wait in the database.
    assert notifier.log == [] and await outbox_rows(host.db) == 2
    notifier.down = False
    async with host.vmmgr() as capsules:
        capsules.events.nudge()  # what vmmgr's start does
        await until_sent(host.db)
    assert notifier.about(capsule_id) == [("capsule.create", "success", None),
                                          ("capsule.state.changed", None, "running")]


async def test_a_resume_a_restart_interrupted_is_logged_when_reconcile_settles_it(host: Host) -> None:
    """vmmgr killed while a capsule resumed, its VM running: the restart's reconcile makes
    it ``running`` and logs the resume the client asked for (once)."""
    notifier = host.notifier
    async with host.vmmgr() as capsules:
        capsule_id = await create_running(capsules)
    await host.db.execute("UPDATE capsules SET status = 'resuming' WHERE id = %s", (capsule_id,))
    async with host.vmmgr() as capsules:
        plan = await reconcile(capsules)
        assert plan.keep == [capsule_id]
        assert (await wait_status(capsules, capsule_id, "running")).status == "running"
        await until_sent(host.db)
    assert notifier.about(capsule_id)[-2:] == [("capsule.state.changed", None, "running"),
                                               ("capsule.resume", "success", None)]
    assert [e for e, _, _ in notifier.about(capsule_id)].count("capsule.resume") == 1


async def test_a_pause_a_restart_interrupted_is_carried_out_and_logged_once(host: Host) -> None:
    """vmmgr killed after it accepted a pause, before the save: the restart's reconcile
    pauses the capsule (what the client asked for); a pause for vmmgr's own stop is
    not wanted any more, and that capsule runs on."""
    notifier = host.notifier
    async with host.vmmgr() as capsules:
        asked, for_stop = await create_running(capsules), await create_running(capsules)
    for capsule_id, reason in ((asked, "user"), (for_stop, "shutdown")):
        await host.db.execute("UPDATE capsules SET status = 'pausing', pause_reason = %s WHERE id = %s",
                              (reason, capsule_id))
    async with host.vmmgr() as capsules:
        Snapshots(capsules)
        plan = await reconcile(capsules)
        assert sorted(plan.keep) == sorted([asked, for_stop])
        assert (await wait_status(capsules, asked, "paused")).status == "paused"
        reason = await host.db.fetchval("SELECT pause_reason FROM capsules WHERE id = %s", (asked,))
        assert reason == "user"
        assert (await wait_status(capsules, for_stop, "running")).status == "running"
        reply = await capsules.exec(m.ExecCommand(actor=ANA, capsule_id=for_stop, cmd="echo on"))
        assert reply.result is not None and reply.result.stdout == "on\n"
        await until_sent(host.db)
    pauses = [(o, new) for e, o, new in notifier.about(asked) if e != "capsule.create"]
    assert pauses[-2:] == [(None, "paused"), ("success", None)]
    assert [e for e, _, _ in notifier.about(asked)].count("capsule.pause") == 1
    assert notifier.about(for_stop)[-1] == ("capsule.pause", "error", None)
