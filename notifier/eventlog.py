"""The durable lifecycle event log: append, list, retain, publish.

:class:`~dovecote.bus.messages.events.RecordEvent` appends an event and
replies with its id (:class:`~dovecote.bus.messages.events.RecordEvents`
appends several in one transaction, in order, and replies with their ids);
only after the commit is each published on
:data:`~dovecote.bus.messages.events.EVENT_TOPIC`. Appends are serialised
(one transaction at a time in this process, under a transaction-level
advisory lock across processes), so ids become visible in increasing order
and a reader that has seen id *n* never later finds a smaller id appear.

The same transaction calls ``on_append(conn, appended)`` with the
``(id, team_id, event)`` of every event it appended, which the deliverer uses
to queue the teams' channel deliveries: an event is in the log if and only if
its deliveries are queued. A batch costs two statements, however many events
it holds (three when its events carry idempotency keys: an event whose key the
log holds is not appended again, and its reply is the id it has).

:meth:`EventLog.run` deletes events older than ``event_retention_s``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import trio

from dovecote.bus.messages import events as ev
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.runtime import ServiceContext

log = get_logger("dovecote.notifier.eventlog")

APPEND_LOCK_KEY = 0x646F7665_6576656E & 0x7FFFFFFFFFFFFFFF
"""Advisory lock id serialising appends across notifier processes."""
MAX_LIST = 1000
PURGE_INTERVAL_S = 60.0

OnAppend = Callable[[Any, list[tuple[int, str, ev.LifecycleEvent]]], None]

_encode = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(ev.LifecycleEvent).decode


class EventLog:
    """Appends, lists and retains lifecycle events; publishes each appended one."""

    def __init__(self, ctx: ServiceContext[Any], *, on_append: OnAppend) -> None:
        self.ctx = ctx
        self.on_append = on_append
        self._append_lock = trio.Lock()

    def register(self) -> None:
        """Register the bus handlers."""
        self.ctx.handle(ev.RecordEvent, self.record)
        self.ctx.handle(ev.RecordEvents, self.record_batch)
        self.ctx.handle(ev.ListEvents, self.list)

    @property
    def _db(self) -> Any:
        assert self.ctx.db is not None
        return self.ctx.db

    async def record(self, msg: ev.RecordEvent) -> ev.EventRecorded:
        """Append one event, queue its deliveries, then publish it."""
        ids = await self._append([msg])
        return ev.EventRecorded(id=ids[0])

    async def record_batch(self, msg: ev.RecordEvents) -> ev.EventsRecorded:
        """Append several events in one transaction (ids in list order), then publish each."""
        return ev.EventsRecorded(ids=await self._append(msg.events) if msg.events else [])

    async def _append(self, items: list[ev.RecordEvent]) -> list[int]:
        for item in items:
            if item.event.event not in ev.EVENT_NAMES:
                # Unknown names are kept too (hosts may report new ones), but must be sane.
                name = item.event.event
                if not name or len(name) > 100 or not name.isprintable():
                    raise ServiceError(400, "invalid_event", "event name must be 1..100 printable characters")
            if len(item.key) > 200:
                raise ServiceError(400, "invalid_event", "an event's key is at most 200 characters")

        def append(conn: Any) -> tuple[list[int], list[tuple[int, ev.RecordEvent]]]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_KEY,))
            by_key: dict[str, int] = {}
            keys = [item.key for item in items if item.key]
            if keys:  # events the log holds already (a publisher's retry) are not appended again
                by_key = {r["source_key"]: int(r["id"]) for r in conn.execute(
                    "SELECT source_key, id FROM events WHERE source_key = ANY(%s)", (keys,)).fetchall()}
            fresh: list[int] = []  # the items to append, by index
            for n, item in enumerate(items):
                if item.key:
                    if item.key in by_key:
                        continue
                    by_key[item.key] = 0  # a key twice in one batch is appended once
                fresh.append(n)
            ids = [0] * len(items)
            appended: list[tuple[int, ev.RecordEvent]] = []
            if fresh:
                new = [items[n] for n in fresh]
                # Rows are made (and their ids drawn) in list order: sorted ids are the items' ids.
                rows = conn.execute(
                    "INSERT INTO events (team_id, name, body, source_key)"
                    " SELECT team_id, name, body::jsonb, source_key"
                    " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])"
                    " WITH ORDINALITY AS e(team_id, name, body, source_key, n) ORDER BY n RETURNING id",
                    ([i.team_id for i in new], [i.event.event for i in new],
                     [_encode(i.event).decode() for i in new], [i.key or None for i in new])).fetchall()
                for n, event_id in zip(fresh, sorted(int(r["id"]) for r in rows), strict=True):
                    ids[n] = event_id
                    appended.append((event_id, items[n]))
                    if items[n].key:
                        by_key[items[n].key] = event_id
                self.on_append(conn, [(event_id, item.team_id, item.event) for event_id, item in appended])
            for n, item in enumerate(items):
                if not ids[n]:
                    ids[n] = by_key[item.key]
            return ids, appended

        async with self._append_lock:
            ids, appended = await self._db.transaction(append)
            # Published under the lock: subscribers see ids in increasing order.
            for event_id, item in appended:
                await self.ctx.bus.publish(ev.EVENT_TOPIC, ev.EventAppended(
                    id=event_id, team_id=item.team_id, event=item.event))
        return ids

    async def list(self, msg: ev.ListEvents) -> ev.EventList:
        """Events after ``msg.after`` (one team's, or all), oldest first."""
        limit = max(1, min(msg.limit, MAX_LIST))
        if msg.team_id:
            rows = await self._db.fetchall(
                "SELECT id, team_id, body::text AS body FROM events"
                " WHERE team_id = %s AND id > %s ORDER BY id LIMIT %s",
                (msg.team_id, msg.after, limit))
        else:
            rows = await self._db.fetchall(
                "SELECT id, team_id, body::text AS body FROM events WHERE id > %s ORDER BY id LIMIT %s",
                (msg.after, limit))
        last_id = await self._db.fetchval("SELECT coalesce(max(id), 0) FROM events")
        return ev.EventList(
            events=[ev.EventAppended(id=int(r["id"]), team_id=r["team_id"], event=_decode_event(r["body"]))
                    for r in rows],
            last_id=int(last_id))

    async def purge_expired(self) -> int:
        """Delete events older than the retention; how many went."""
        retention = float(getattr(self.ctx.config, "event_retention_s", 7 * 24 * 3600.0))
        return int(await self._db.execute(
            "DELETE FROM events WHERE created_at < now() - make_interval(secs => %s)", (retention,)))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Purge expired events every minute until cancelled."""
        task_status.started()
        while True:
            try:
                removed = await self.purge_expired()
                if removed:
                    log.info("expired events purged", extra={"count": removed})
            except Exception as exc:
                log.warning("event purge failed", extra={"error": repr(exc)})
            await trio.sleep(PURGE_INTERVAL_S)
