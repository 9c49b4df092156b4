"""Lifecycle events on their way to the notifier's log: written with the change, sent until answered.

A capsule's change and the events that report it (``capsule.create``,
``capsule.state.changed``, ``capsule.resume``...) commit in one transaction:
:meth:`EventOutbox.stage` writes the events as rows of ``event_outbox`` on the
change's own connection. One task per vmmgr then sends its host's rows to the
notifier in ``seq`` order, as a :class:`~dovecote.bus.messages.events.RecordEvents`
whose items carry each row's key, and deletes them once the notifier answered.

- A send that fails (the notifier or the bus down, a timeout) is tried again
  after a back-off. The notifier appends a key once, so a reply lost after its
  commit (a notifier killed in between) doubles nothing.
- A vmmgr killed with rows unsent leaves them for the next one, which sends
  them when it starts.
- A batch the notifier refuses (4xx) is sent again row by row, and only the
  refused rows are dropped, each logged: a bad event never holds up the rest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from dovecote.bus.messages import events as ev
from dovecote.libs.db import Connection, Database
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.vmmgr.event_outbox")

Request = Callable[..., Awaitable[Any]]
Staged = list[tuple[str, ev.LifecycleEvent]]
"""Events to record, each with its team's id."""

BATCH = 100
"""Rows sent in one request."""
SEND_TIMEOUT_S = 10.0
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0
SWEEP_S = 30.0
"""A look at the outbox even when nothing was staged (rows a failed read left)."""

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(ev.LifecycleEvent).decode


class EventOutbox:
    """This host's ``event_outbox`` rows and the task that sends them to the notifier."""

    def __init__(self, *, db: Database, host_id: str, nursery: trio.Nursery) -> None:
        self.db = db
        self.host_id = host_id
        self.nursery = nursery
        self.request: Request | None = None
        """The bus's request (to the notifier); None: nothing is staged or sent."""
        self._wake = trio.Event()
        self._started = False
        self._sending = trio.Lock()

    def stage(self, conn: Connection, events: Staged) -> None:
        """Write ``events`` on ``conn``, in its transaction, in list order (then :meth:`nudge`)."""
        if not events or self.request is None:
            return
        conn.execute(
            "INSERT INTO event_outbox (host_id, team_id, body)"
            " SELECT %s, team_id, body::jsonb FROM unnest(%s::text[], %s::text[])"
            " WITH ORDINALITY AS e(team_id, body, n) ORDER BY n",
            (self.host_id, [team_id for team_id, _ in events],
             [_encode(event).decode() for _, event in events]))

    def nudge(self) -> None:
        """Rows were staged: send them (the first nudge starts the sending task)."""
        if self.request is None:
            return
        if not self._started:
            self._started = True
            self.nursery.start_soon(self._run)
        self._wake.set()

    async def _run(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            self._wake = trio.Event()  # a nudge during the flush wakes the next wait
            if await self.flush():
                delay = RETRY_FIRST_S
                with trio.move_on_after(SWEEP_S):
                    await self._wake.wait()
            else:
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def flush(self) -> bool:
        """Send this host's rows until none is left; False when a read or a send failed."""
        async with self._sending:
            while True:
                request = self.request
                if request is None:
                    return True
                try:
                    rows = await self.db.fetchall(
                        "SELECT seq, key, team_id, body::text AS body FROM event_outbox"
                        " WHERE host_id = %s ORDER BY seq LIMIT %s", (self.host_id, BATCH))
                except Exception as exc:
                    log.warning("could not read the event outbox", extra={"error": repr(exc)})
                    return False
                if not rows:
                    return True
                sent = await self._send(request, rows)
                if sent:
                    try:
                        await self.db.execute("DELETE FROM event_outbox WHERE seq = ANY(%s)", (sent,))
                    except Exception as exc:
                        log.warning("could not clear sent events", extra={"error": repr(exc)})
                        return False
                if len(sent) < len(rows):
                    return False

    async def _send(self, request: Request, rows: list[dict[str, Any]]) -> list[int]:
        """Send ``rows``; the seqs the notifier recorded or refused (both are done with)."""
        items: list[tuple[int, ev.RecordEvent]] = []
        done: list[int] = []
        for row in rows:
            try:
                event = _decode(row["body"])
            except msgspec.DecodeError:
                log.error("an unreadable event in the outbox dropped", extra={"seq": row["seq"]})
                done.append(row["seq"])
                continue
            items.append((row["seq"], ev.RecordEvent(team_id=row["team_id"], event=event, key=row["key"])))
        if not items:
            return done
        try:
            await request("notifier", ev.RecordEvents(events=[item for _, item in items]),
                          timeout=SEND_TIMEOUT_S)
            return [*done, *(seq for seq, _ in items)]
        except ServiceError as exc:
            if len(items) == 1:
                log.error("the notifier refused an event; dropped",
                          extra={"event": items[0][1].event.event, "error": str(exc)})
                return [*done, items[0][0]]
        except Exception as exc:
            log.warning("lifecycle events not recorded yet", extra={"count": len(items), "error": repr(exc)})
            return done
        # A refused batch: row by row, so only the refused ones are dropped.
        for seq, item in items:
            try:
                await request("notifier", ev.RecordEvents(events=[item]), timeout=SEND_TIMEOUT_S)
            except ServiceError as exc:
                log.error("the notifier refused an event; dropped",
                          extra={"event": item.event.event, "error": str(exc)})
            except Exception as exc:
                log.warning("lifecycle events not recorded yet", extra={"error": repr(exc)})
                return done
            done.append(seq)
        return done

    async def close(self, timeout_s: float) -> None:
        """At stop: send what is staged, for up to ``timeout_s`` (the rest waits for the next start)."""
        with trio.move_on_after(timeout_s):
            await self.flush()
