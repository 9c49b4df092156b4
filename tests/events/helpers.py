"""Clients of the event streams over real HTTP, and events sent to a running suite's log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from dovecote.bus.messages.events import EventRecorded, LifecycleEvent, RecordEvent
from dovecote.services.client import open_cli_bus
from tests.events.fakes import Frame
from tests.helpers.suite import Suite


class SSE:
    """One open event stream: ``await sse.frame()`` is the next message."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self._lines = response.aiter_lines()

    async def frame(self, *, comments: bool = False) -> Frame:
        fields: dict[str, str] = {}
        async for line in self._lines:
            if not line:
                if fields:
                    return Frame(event=fields.get("event", "message"),
                                 id=int(fields["id"]) if "id" in fields else None,
                                 data=json.loads(fields["data"]) if "data" in fields else None)
                continue
            if line.startswith(":"):
                if comments:
                    return Frame(comment=line[1:].strip())
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        raise EOFError("the stream ended")

    async def until(self, resource_id: str) -> Frame:
        """The next event about ``resource_id`` (others are skipped)."""
        while True:
            frame = await self.frame()
            if frame.data and frame.data.get("resource", {}).get("id") == resource_id:
                return frame

    async def events(self, count: int) -> list[Frame]:
        return [await self.frame() for _ in range(count)]

    async def error(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(await self.response.aread())
        return body


@asynccontextmanager
async def open_sse(suite: Suite, path: str = "/v1/events/stream", *, key: str | None = None,
                   cookies: httpx.Cookies | None = None, headers: dict[str, str] | None = None,
                   params: dict[str, str] | None = None) -> AsyncIterator[SSE]:
    """Open an event stream as ``X-API-Key: key`` or with a browser's ``cookies``."""
    sent = dict(headers or {})
    if key:
        sent["X-API-Key"] = key
    async with httpx.AsyncClient(base_url=suite.url, cookies=cookies,
                                 timeout=httpx.Timeout(30.0, read=None)) as client:
        async with client.stream("GET", path, headers=sent, params=params) as response:
            yield SSE(response)


async def record(suite: Suite, team_id: str, *events: LifecycleEvent) -> list[int]:
    """Append ``events`` to the suite's event log as a publisher would; their ids."""
    ids = []
    async with open_cli_bus(suite.data_dir) as bus:
        for event in events:
            reply = await bus.request("notifier", RecordEvent(team_id=team_id, event=event), timeout=10)
            assert isinstance(reply, EventRecorded), reply
            ids.append(reply.id)
    return ids


async def record_many(suite: Suite, team_id: str, events: list[LifecycleEvent], *,
                      workers: int = 8) -> list[int]:
    """Append ``events`` with ``workers`` concurrent requests (a burst); their ids."""
    ids: list[int] = []
    async with open_cli_bus(suite.data_dir) as bus:
        send, receive = trio.open_memory_channel[LifecycleEvent](len(events))
        for event in events:
            send.send_nowait(event)
        send.close()

        async def work() -> None:
            async for event in receive:
                reply = await bus.request("notifier", RecordEvent(team_id=team_id, event=event),
                                          timeout=30)
                assert isinstance(reply, EventRecorded), reply
                ids.append(reply.id)

        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(work)
    return sorted(ids)
