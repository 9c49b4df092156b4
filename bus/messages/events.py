"""Lifecycle events: the durable event log of the notifier service and its fan-out.

A *lifecycle event* is something a user may see happen: a capsule created,
paused, resumed or destroyed, a capsule's status changed, a template snapshot
created or deleted, a host up or down. Its body, :class:`LifecycleEvent`, is
the reference's ``SSEEvent`` (the JSON of an SSE ``data:`` line).

Flow (append before fan-out, so a reader never sees an event the log lacks):

1. a publisher (vmmgr, auth, the gateway's host callback) sends
   :class:`RecordEvent` to the ``notifier`` service (a busy one, the agents
   service, sends what its queue holds as one :class:`RecordEvents`);
2. the notifier appends it to its event log in one transaction (which also
   queues the deliveries of the team's subscribed channels), assigning the next
   monotonically increasing ``id``, and replies :class:`EventRecorded`;
3. the notifier publishes :class:`EventAppended` on topic :data:`EVENT_TOPIC`;
4. SSE streams follow the topic and fill any gap (the event plane may drop
   under burst) with :class:`ListEvents`, which also serves ``Last-Event-ID``
   resumes.

Publishers use :func:`record_event` and never fail their own operation when
the notifier is down: the event is then lost, and the failure is logged. vmmgr
loses none: its capsule events are written to an outbox in the transaction of
the change they report and sent with an idempotency key until the notifier
answers (``vmmgr/event_outbox.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from dovecote.libs.logs import get_logger

from .base import Family, Message
from .capsules import Capsule

log = get_logger("dovecote.bus.messages.events")

EVENT_TOPIC = "events.lifecycle"
"""Event-plane topic of :class:`EventAppended`."""

EVENT_NAMES = (
    "capsule.create",
    "capsule.pause",
    "capsule.resume",
    "capsule.destroy",
    "capsule.state.changed",
    "template.snapshot.create",
    "template.snapshot.delete",
    "host.up",
    "host.down",
    # the agent runtime (bus/messages/agents.py AGENT_EVENT_NAMES)
    "agent.session.created",
    "agent.session.spawned",
    "agent.session.stopped",
    "agent.task.created",
    "agent.task.queued",
    "agent.task.claimed",
    "agent.task.completed",
    "agent.task.failed",
    "agent.task.released",
    "agent.task.requeued",
)
"""Event names of the reference's ``SSEEvent`` (besides the ``connected`` sentinel)."""

CHANNEL_EVENT_NAMES = tuple(name for name in EVENT_NAMES if name != "capsule.state.changed")
"""Event names a notification channel can subscribe to."""


class EventResource(msgspec.Struct, kw_only=True):
    """What the event is about (``type``: ``capsule``, ``template``, ``host``)."""

    id: str
    type: str


class EventActor(msgspec.Struct, kw_only=True):
    """Who caused it (``type``: ``user``, ``api_key`` or ``system``)."""

    type: str
    id: str = ""
    name: str = ""


class LifecycleEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The reference's ``SSEEvent`` body.

    ``outcome`` is set for action events (``capsule.*`` except
    ``capsule.state.changed``, ``template.snapshot.*``); ``error`` only when
    ``outcome`` is ``error``; ``sandbox`` for ``capsule.*`` events.
    """

    event: str
    resource: EventResource
    actor: EventActor
    timestamp: str
    outcome: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    error: str | None = None
    sandbox: Capsule | None = None


class RecordEvent(Message, tag="events.record", kw_only=True):
    """Append ``event`` to the log (``team_id`` empty: visible to admins only).

    ``key`` (optional) is the publisher's idempotency key: an event sent again
    with the key of one the log holds is not appended twice, and the reply is
    the id it already has. A publisher that retries until it hears back (vmmgr's
    outbox) so records each event exactly once.
    """

    team_id: str
    event: LifecycleEvent
    key: str = ""


class EventRecorded(Message, tag="events.recorded", kw_only=True):
    """The id the log gave the event."""

    id: int


class RecordEvents(Message, tag="events.record_batch", kw_only=True):
    """Append several events in one transaction, in list order (a busy publisher's queue)."""

    events: list[RecordEvent]


class EventsRecorded(Message, tag="events.recorded_batch", kw_only=True):
    """The ids the log gave the events of :class:`RecordEvents`, in order."""

    ids: list[int]


class EventAppended(Message, tag="events.appended", kw_only=True):
    """An event the log holds (published on :data:`EVENT_TOPIC`, listed by :class:`ListEvents`)."""

    id: int
    team_id: str
    event: LifecycleEvent


class ListEvents(Message, tag="events.list", kw_only=True):
    """Events with ``id > after`` in id order, at most ``limit``.

    ``team_id`` empty means every team (admin streams only; the gateway
    checks). ``after`` below the oldest retained id returns from the oldest.
    """

    team_id: str = ""
    after: int = 0
    limit: int = 500


class EventList(Message, tag="events.list_result", kw_only=True):
    """Answer to :class:`ListEvents`; ``last_id`` is the newest id in the whole log (0 if empty)."""

    events: list[EventAppended]
    last_id: int


async def record_event(request: Callable[..., Awaitable[Any]], team_id: str, event: LifecycleEvent, *,
                       timeout_s: float = 5.0) -> int | None:
    """Send ``event`` to the notifier's log; the new id, or ``None`` if it could not be recorded.

    Never raises for a bus failure: a lifecycle event must not fail the action it reports.
    """
    try:
        reply = await request("notifier", RecordEvent(team_id=team_id, event=event), timeout=timeout_s)
    except Exception as exc:
        log.warning("lifecycle event not recorded", extra={"event": event.event, "error": repr(exc)})
        return None
    if isinstance(reply, EventRecorded):
        return reply.id
    log.warning("lifecycle event refused", extra={"event": event.event, "reply": type(reply).__name__})
    return None


async def record_events(request: Callable[..., Awaitable[Any]], events: list[RecordEvent], *,
                        timeout_s: float = 5.0) -> bool:
    """Send several events to the notifier's log in one request; whether they were recorded.

    Never raises for a bus failure, like :func:`record_event`.
    """
    try:
        reply = await request("notifier", RecordEvents(events=events), timeout=timeout_s)
    except Exception as exc:
        log.warning("lifecycle events not recorded", extra={"count": len(events), "error": repr(exc)})
        return False
    if isinstance(reply, EventsRecorded):
        return True
    log.warning("lifecycle events refused", extra={"count": len(events), "reply": type(reply).__name__})
    return False


FAMILY = Family("events", __name__)
"""The events messages and their one Decoder (define every message above this line)."""
