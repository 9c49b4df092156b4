"""Lifecycle events of the agent runtime, recorded in the notifier's log in order.

State changes happen in this service's transactions (with their audit
entries); the matching ``agent.session.*`` / ``agent.task.*`` event is then
queued here and sent by one task, in order, with
:func:`~dovecote.bus.messages.events.record_event`: the notifier appends it to
its log, from which SSE streams and notification channels read. Like every
publisher, an action never waits for, nor fails with, its event; a full
queue (the notifier is down or slower than the agents) drops new events and
counts them in ``dovecote_agents_events_dropped``.
"""

from __future__ import annotations

from typing import Any

import trio
from prometheus_client import Counter

from dovecote.bus.messages.agents import Ref
from dovecote.bus.messages.events import EventActor, EventResource, LifecycleEvent, record_event
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import now_rfc3339

log = get_logger("dovecote.agents.events")
DROPPED = Counter("dovecote_agents_events_dropped", "Agent lifecycle events dropped (queue full).")
ACTOR_TYPES = {"human": "user", "api_key": "api_key", "agent_session": "agent_session", "system": "system"}


class EventQueue:
    """Ordered, bounded, non-blocking queue of lifecycle events to record."""

    def __init__(self, request: Any, size: int) -> None:
        self._request = request
        self._send, self._receive = trio.open_memory_channel[tuple[str, LifecycleEvent]](size)

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
            self._send.send_nowait((team_id, event))
        except trio.WouldBlock:
            DROPPED.inc()
            log.warning("agent lifecycle event dropped: queue full", extra={"event": name})

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Record queued events one at a time, forever."""
        task_status.started()
        async for team_id, event in self._receive:
            await record_event(self._request, team_id, event)
