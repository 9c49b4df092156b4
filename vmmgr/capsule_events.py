"""What a capsule's changes tell the rest of the platform.

Two outputs:

- ``capsule.state`` bus events (:class:`~dovecote.bus.messages.capsules.CapsuleStateChanged`),
  published at each status change, best effort, for the gateway's SSE and the
  hosts registry (the record in ``capsules`` is the truth);
- lifecycle events (``capsule.create``, ``capsule.state.changed``...) for the
  notifier's log, written in the transaction of the change they report and sent
  from there (:mod:`~dovecote.vmmgr.event_outbox`): each is recorded once, in
  the order the changes happened, whatever process dies meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from dovecote.bus.messages import capsules as m
from dovecote.bus.messages import events as ev
from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Connection, Database
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import now_rfc3339, rfc3339
from dovecote.vmmgr.capsule_store import Row, Stage, Status, to_capsule
from dovecote.vmmgr.event_outbox import EventOutbox

log = get_logger("dovecote.vmmgr.capsules")

Publish = Callable[[str, Any], Awaitable[None]]
Request = Callable[..., Awaitable[Any]]


def event_actor(actor: Principal | None) -> ev.EventActor:
    """Who an event names: an API key, a user (session), else the system (hosts, vmmgr itself)."""
    if actor is not None and actor.auth_type == "api_key":
        return ev.EventActor(type="api_key", id=actor.api_key_id, name=actor.api_key_name)
    if actor is not None and actor.auth_type == "session":
        return ev.EventActor(type="user", id=actor.user_id, name=actor.name or actor.email)
    return ev.EventActor(type="system")


@dataclass(frozen=True)
class Happened:
    """A lifecycle event about a capsule that a change reports (``capsule.pause``...)."""

    name: str
    actor: Principal | None = None
    outcome: str | None = "success"
    error: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class EventRecorder:
    """Publishes state changes and stages lifecycle events with the changes they report."""

    def __init__(self, *, db: Database, host_id: str, publish: Publish, request: Request | None,
                 nursery: trio.Nursery) -> None:
        self.publish = publish
        self.outbox = EventOutbox(db=db, host_id=host_id, nursery=nursery)
        self.outbox.request = request

    @property
    def request(self) -> Request | None:
        """The bus's request (to the notifier); None: lifecycle events are not recorded."""
        return self.outbox.request

    @request.setter
    def request(self, request: Request | None) -> None:
        self.outbox.request = request

    def stager(self, happened: Happened | None = None) -> Stage | None:
        """What a change's transaction runs once its row is written: it stages the
        ``capsule.state.changed`` of a new status (the row's ``old_status`` differs),
        then ``happened``. None when lifecycle events are not recorded."""
        if self.request is None:
            return None

        def stage(conn: Connection, row: Row) -> None:
            events: list[ev.LifecycleEvent] = []
            old = row.get("old_status")
            if old is not None and old != row["status"]:
                meta = {"from": old, "to": row["status"]}
                if row["status"] == Status.ERROR and row["error"]:
                    meta["error"] = str(row["error"])[:500]
                changed = Happened("capsule.state.changed", outcome=None, metadata=meta)
                events.append(self._event(changed, row))
            if happened is not None:
                events.append(self._event(happened, row))
            self.outbox.stage(conn, [(row["team_id"], event) for event in events])

        return stage

    @staticmethod
    def _event(happened: Happened, row: Row) -> ev.LifecycleEvent:
        return ev.LifecycleEvent(
            event=happened.name, resource=ev.EventResource(id=row["id"], type="capsule"),
            actor=event_actor(happened.actor), timestamp=now_rfc3339(), outcome=happened.outcome,
            error=happened.error if happened.outcome == "error" else None,
            metadata=dict(happened.metadata), sandbox=to_capsule(row))

    def nudge(self) -> None:
        """A change's transaction committed: send what it staged."""
        self.outbox.nudge()

    async def close(self, timeout_s: float) -> None:
        """At stop: send what is staged, for up to ``timeout_s`` (the next start sends the rest)."""
        await self.outbox.close(timeout_s)

    async def announce(self, row: Row, old: str | None) -> None:
        """Publish a capsule's new status on the bus (``old`` None: it was just created)."""
        event = m.CapsuleStateChanged(
            capsule_id=row["id"], team_id=row["team_id"], host_id=row["host_id"], old_status=old,
            new_status=row["status"], error=row["error"] if row["status"] == Status.ERROR else None,
            at=rfc3339(row["updated_at"]) or "")
        try:
            await self.publish(m.CAPSULE_STATE_TOPIC, event)
        except Exception:  # the record is the truth; an event lost on a closing bus is not fatal
            log.warning("could not publish the capsule event", exc_info=True,
                        extra={"capsule_id": row["id"]})
