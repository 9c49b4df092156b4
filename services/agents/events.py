"""Lifecycle events of the agent runtime, recorded in the notifier's log in order.

State changes happen in this service's transactions (with their audit
entries); the matching ``agent.session.*`` / ``agent.task.*`` event is then
queued here and sent by one task, in order, as batches
(:class:`~dovecote.bus.messages.events.RecordEvents`, up to :data:`BATCH`
events), which the notifier appends to its log in one transaction. Batches
start at most every :data:`INTERVAL_S`: an event of a quiet runtime goes at
once, while a busy one's events gather until the interval since the last
batch has passed, so the notifier's cost (a transaction, a bus request, a
wake-up of its deliverer, mostly per batch) stays at most a few batches a
second however many agents are at work, for at most that much latency. SSE streams and
notification channels read that log. Like every
publisher, an action never waits for, nor fails with, its event; a full
queue (the notifier is down or slower than the agents) drops new events and
counts them in ``dovecote_agents_events_dropped``.
"""

from __future__ import annotations

from typing import Any

import trio
from prometheus_client import Counter

from dovecote.bus.messages.agents import Ref
from dovecote.bus.messages.events import (
    EventActor,
    EventResource,
    LifecycleEvent,
    RecordEvent,
    record_events,
)
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import now_rfc3339

log = get_logger("dovecote.agents.events")
DROPPED = Counter("dovecote_agents_events_dropped", "Agent lifecycle events dropped (queue full).")
BATCHES = Counter("dovecote_agents_event_batches", "Batches of lifecycle events sent to the notifier.")
SENT = Counter("dovecote_agents_events_sent", "Lifecycle events sent to the notifier (in batches).")
BATCH = 200
"""Most events sent in one request to the notifier."""
INTERVAL_S = 0.1
"""Least time between the starts of two batches (the most an event waits for its batch)."""
ACTOR_TYPES = {"human": "user", "api_key": "api_key", "agent_session": "agent_session", "system": "system"}


class EventQueue:
    """Ordered, bounded, non-blocking queue of lifecycle events to record."""

    def __init__(self, request: Any, size: int) -> None:
        self._request = request
        self._send, self._receive = trio.open_memory_channel[RecordEvent](size)

    def emit(
        self,
        team_id: str,
        name: str,
        resource_type: str,
        resource_id: str,
        actor: Ref,
        metadata: dict[str, str] | None = None,
    ) -> None:
        event = LifecycleEvent(
            event=name,
            resource=EventResource(id=resource_id, type=resource_type),
            actor=EventActor(type=ACTOR_TYPES.get(actor.kind, actor.kind), id=actor.ref),
            timestamp=now_rfc3339(),
            metadata=metadata or {},
        )
        try:
            self._send.send_nowait(RecordEvent(team_id=team_id, event=event))
        except trio.WouldBlock:
            DROPPED.inc()
            log.warning("agent lifecycle event dropped: queue full", extra={"event": name})

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Record queued events in order, a batch at a time, forever."""
        task_status.started()
        last = -INTERVAL_S
        async for first in self._receive:
            batch = [first]
            with trio.move_on_at(last + INTERVAL_S):
                while len(batch) < BATCH:
                    batch.append(await self._receive.receive())
            while len(batch) < BATCH:  # what is queued already goes too
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            last = trio.current_time()
            BATCHES.inc()
            SENT.inc(len(batch))
            await record_events(self._request, batch)
