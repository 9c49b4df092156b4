"""What a capsule's changes tell the rest of the platform.

Two outputs, both best-effort (the record in ``capsules`` is the truth):

- ``capsule.state`` bus events (:class:`~dovecote.bus.messages.capsules.CapsuleStateChanged`),
  published at each status change, for the gateway's SSE and the hosts registry;
- lifecycle events (``capsule.create``, ``capsule.state.changed``...) for the
  notifier's log, queued and recorded in order by one task, so a reader sees a
  capsule's events in the order they happened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dovecote.bus.messages import capsules as m
from dovecote.bus.messages import events as ev
from dovecote.bus.messages.common import Principal
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import now_rfc3339, rfc3339
from dovecote.vmmgr.capsule_store import Row, Status, to_capsule

log = get_logger("dovecote.vmmgr.capsules")

Publish = Callable[[str, Any], Awaitable[None]]
Request = Callable[..., Awaitable[Any]]

EVENT_QUEUE = 10_000
"""Lifecycle events waiting to be recorded before new ones are dropped."""


def event_actor(actor: Principal | None) -> ev.EventActor:
    """Who an event names: an API key, a user (session), else the system (hosts, vmmgr itself)."""
    if actor is not None and actor.auth_type == "api_key":
        return ev.EventActor(type="api_key", id=actor.api_key_id, name=actor.api_key_name)
    if actor is not None and actor.auth_type == "session":
        return ev.EventActor(type="user", id=actor.user_id, name=actor.name or actor.email)
    return ev.EventActor(type="system")


class EventRecorder:
    """Publishes state changes and records lifecycle events (never fails its caller)."""

    def __init__(self, *, publish: Publish, request: Request | None, nursery: trio.Nursery) -> None:
        self.publish = publish
        self.request = request
        """The bus's request (to the notifier); None: lifecycle events are not recorded."""
        self.nursery = nursery
        self._events: trio.MemorySendChannel[tuple[str, ev.LifecycleEvent]] | None = None
        self._closed = False
        self._done = trio.Event()

    def emit(self, name: str, row: Row, *, actor: Principal | None = None,
             outcome: str | None = "success", error: str | None = None,
             metadata: dict[str, str] | None = None) -> None:
        """Record a lifecycle event about a capsule (in the background)."""
        if self.request is None:
            return
        event = ev.LifecycleEvent(
            event=name, resource=ev.EventResource(id=row["id"], type="capsule"), actor=event_actor(actor),
            timestamp=now_rfc3339(), outcome=outcome, error=error if outcome == "error" else None,
            metadata=metadata or {}, sandbox=to_capsule(row))
        self.record(row["team_id"], event)

    def record(self, team_id: str, event: ev.LifecycleEvent) -> None:
        """Queue a lifecycle event for the notifier's log. Never blocks: past
        :data:`EVENT_QUEUE` waiting events, new ones are dropped with a warning."""
        if self.request is None:
            return
        if self._closed:
            log.warning("lifecycle event dropped: vmmgr has stopped", extra={"event": event.event})
            return
        if self._events is None:
            send, receive = trio.open_memory_channel[tuple[str, ev.LifecycleEvent]](EVENT_QUEUE)
            self._events = send
            self.nursery.start_soon(self._record_events, receive)
        try:
            self._events.send_nowait((team_id, event))
        except trio.WouldBlock:
            log.warning("lifecycle event dropped: the notifier is behind", extra={"event": event.event})

    async def _record_events(self, receive: trio.MemoryReceiveChannel[tuple[str, ev.LifecycleEvent]]) -> None:
        assert self.request is not None
        try:
            async with receive:
                async for team_id, event in receive:
                    await ev.record_event(self.request, team_id, event)
        finally:
            self._done.set()

    async def close(self, timeout_s: float) -> None:
        """At stop: record the events still queued (for up to ``timeout_s``), then take no more."""
        self._closed = True
        if self._events is None:
            return
        self._events.close()
        with trio.move_on_after(timeout_s):
            await self._done.wait()

    async def announce(self, row: Row, old: str | None) -> None:
        """Publish a capsule's new status (``old`` None: it was just created)."""
        event = m.CapsuleStateChanged(
            capsule_id=row["id"], team_id=row["team_id"], host_id=row["host_id"], old_status=old,
            new_status=row["status"], error=row["error"] if row["status"] == Status.ERROR else None,
            at=rfc3339(row["updated_at"]) or "")
        try:
            await self.publish(m.CAPSULE_STATE_TOPIC, event)
        except Exception:  # the record is the truth; an event lost on a closing bus is not fatal
            log.warning("could not publish the capsule event", exc_info=True,
                        extra={"capsule_id": row["id"]})
        if old is not None:
            meta = {"from": old, "to": row["status"]}
            if row["status"] == Status.ERROR and row["error"]:
                meta["error"] = str(row["error"])[:500]
            self.emit("capsule.state.changed", row, outcome=None, metadata=meta)
