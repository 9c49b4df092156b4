"""Lifecycle events of the agent runtime, recorded in the notifier's log in order.

State changes happen in this service's transactions (with their audit
entries); the matching ``agent.session.*`` / ``agent.task.*`` event is then
queued here and sent by one task, in order: what the queue holds when the
task comes round, and what comes within :data:`LINGER_S` after (up to
:data:`BATCH` events), goes as one
:class:`~dovecote.bus.messages.events.RecordEvents`, which the notifier
appends to its log in one transaction, so a busy runtime costs the notifier
one commit per batch rather than one per event. SSE streams and
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
BATCH = 200
"""Most events sent in one request to the notifier."""
LINGER_S = 0.02
"""How long a batch waits for more events: a busy runtime's events reach the log in
batches of several (each batch costs the notifier a transaction and a wake-up of its
deliverer), at the price of this much latency."""
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
        async for first in self._receive:
            batch = [first]
            with trio.move_on_after(LINGER_S):
                while len(batch) < BATCH:
                    batch.append(await self._receive.receive())
            await record_events(self._request, batch)
