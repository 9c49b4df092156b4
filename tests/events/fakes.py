"""An in-memory event log and event plane for the SSE stream's own tests, and an SSE parser."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import trio

from dovecote.bus.messages.events import (
    EVENT_TOPIC,
    EventActor,
    EventAppended,
    EventList,
    EventResource,
    LifecycleEvent,
    ListEvents,
)
from dovecote.gateway.openapi import ApiRegistry
from dovecote.gateway.state import GatewayConfig, GatewayState
from dovecote.libs.timefmt import now_rfc3339


def capsule_event(capsule_id: str, name: str = "capsule.create", **fields: Any) -> LifecycleEvent:
    """A lifecycle event about capsule ``capsule_id``."""
    return LifecycleEvent(event=name, resource=EventResource(id=capsule_id, type="capsule"),
                          actor=EventActor(type="system"), timestamp=now_rfc3339(),
                          outcome="success" if name != "capsule.state.changed" else None, **fields)


class FakeBus:
    """The notifier's log (``ListEvents``) and the event plane (``subscribe``), in memory.

    ``append(..., publish=False)`` logs an event the event plane then drops.
    """

    def __init__(self) -> None:
        self.log: list[EventAppended] = []
        self.subscribers: list[trio.MemorySendChannel[tuple[str, Any]]] = []
        self.lists = 0
        self.fail_lists = False
        self.fail_subscribe = False

    async def request(self, service: str, message: Any, **options: Any) -> Any:
        assert service == "notifier" and isinstance(message, ListEvents)
        await trio.lowlevel.checkpoint()
        if self.fail_lists:
            from dovecote.bus import BusTimeout

            raise BusTimeout("notifier did not answer")
        self.lists += 1
        events = [e for e in self.log
                  if e.id > message.after and (not message.team_id or e.team_id == message.team_id)]
        return EventList(events=events[:message.limit], last_id=self.log[-1].id if self.log else 0)

    @asynccontextmanager
    async def subscribe(self, *prefixes: str) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, Any]]]:
        assert prefixes == (EVENT_TOPIC,)
        if self.fail_subscribe:
            from dovecote.bus import BusClosed

            raise BusClosed("the bus is closed")
        send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        self.subscribers.append(send)
        try:
            yield receive
        finally:
            self.subscribers.remove(send)
            send.close()

    def append(self, team_id: str, capsule_id: str, *, publish: bool = True) -> EventAppended:
        appended = EventAppended(id=len(self.log) + 1, team_id=team_id,
                                 event=capsule_event(capsule_id))
        self.log.append(appended)
        if publish:
            for subscriber in self.subscribers:
                subscriber.send_nowait((EVENT_TOPIC, appended))
        return appended


class FakeApp:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery


def fake_state(bus: FakeBus, nursery: trio.Nursery, *, keepalive_s: float = 30.0,
               queue: int = 1024) -> GatewayState:
    config = GatewayConfig(sse_keepalive_s=keepalive_s, sse_queue_events=queue)
    return GatewayState(app=FakeApp(nursery), config=config, bus=bus,
                        api=ApiRegistry("t", "0", ""))


class Frame(NamedTuple):
    """One SSE message (``comment`` set for a ``:`` line)."""

    event: str = ""
    id: int | None = None
    data: Any = None
    comment: str | None = None


def parse_frames(raw: bytes) -> list[Frame]:
    """Every complete message in ``raw`` (comments included)."""
    frames: list[Frame] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                frames.append(Frame(comment=line[1:].strip()))
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if fields:
            frames.append(Frame(event=fields.get("event", "message"),
                                id=int(fields["id"]) if "id" in fields else None,
                                data=json.loads(fields["data"]) if "data" in fields else None))
    return frames
