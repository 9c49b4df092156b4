"""Deliveries of lifecycle events to channels: queued in the database, sent at least once.

Queue. :meth:`Deliverer.enqueue` runs inside the transaction that appends an
event to the log (:mod:`.eventlog`) and inserts one ``pending`` row in
``deliveries`` per channel of the event's team subscribed to its name. The
event is in the log if and only if its deliveries are queued, and the queue
is rows, not memory: a notifier that restarts (or another notifier process)
finds them.

Claiming. :meth:`Deliverer.run` claims due rows (``FOR UPDATE SKIP LOCKED``,
so several notifiers share the work) by counting the attempt and pushing
``next_attempt_at`` past a lease (``DOVECOTE_DELIVERY_TIMEOUT_S`` +
``DOVECOTE_DELIVERY_LEASE_MARGIN_S``). The attempt's outcome then sets the row
``delivered``, ``failed`` or ``pending`` again with its next time. A notifier
killed mid-request leaves the row pending: it is sent again when the lease
ends, which is why delivery is *at least once* (receivers deduplicate on the
delivery key: the webhook's ``X-Dovecote-Delivery``, Matrix's txnId).

Retries. Network errors, timeouts, 408/425/429 and 5xx are retried after an
exponential backoff with jitter (``DOVECOTE_DELIVERY_BACKOFF_BASE_S`` doubling
up to ``DOVECOTE_DELIVERY_BACKOFF_MAX_S``, then a random factor in [0.5, 1]);
a provider's ``Retry-After`` / ``retry_after`` is honoured instead (never
earlier, at most ``DOVECOTE_DELIVERY_MAX_RETRY_AFTER_S``). Other 4xx and 3xx
answers, and a config that no longer opens, fail at once. After
``DOVECOTE_DELIVERY_MAX_ATTEMPTS`` attempts the delivery is ``failed``.

Every attempt is a row of ``delivery_attempts`` (status code or NULL, latency,
error with config values masked); operators read them with the bus message
:class:`~dovecote.bus.messages.channels.ListDeliveryAttempts` or in SQL.

At most ``DOVECOTE_DELIVERY_CONCURRENCY`` requests run at once; each has an
overall deadline of ``DOVECOTE_DELIVERY_TIMEOUT_S``. The loop wakes on every
appended event (topic ``events.lifecycle``), when an attempt ends, when the
next retry is due, and at least every ``DOVECOTE_DELIVERY_POLL_S``. It also
follows ``team.deleted`` and deletes the channels of a deleted team.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import msgspec
import trio

from dovecote.bus.messages.auth_teams import TEAM_DELETED_TOPIC, TeamDeleted
from dovecote.bus.messages.events import EVENT_TOPIC, LifecycleEvent
from dovecote.libs.logs import get_logger

from . import providers
from .channels import ChannelStore, ConfigUnreadable
from .providers import SendResult

log = get_logger("dovecote.notifier.delivery")

_decode_event = msgspec.json.Decoder(LifecycleEvent).decode

CLAIM_SQL = """
WITH due AS (
    SELECT id FROM deliveries
    WHERE status = 'pending' AND next_attempt_at <= now() AND NOT (id = ANY(%(busy)s::bigint[]))
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE deliveries d
    SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => %(lease)s)
    FROM due WHERE d.id = due.id
    RETURNING d.id, d.event_id, d.channel_id, d.attempts
)
SELECT cl.id, cl.event_id, cl.attempts, e.body::text AS body,
       ch.id AS channel_id, ch.provider, ch.config_sealed, ch.key_id
FROM claimed cl
JOIN events e ON e.id = cl.event_id
JOIN channels ch ON ch.id = cl.channel_id
"""

NEXT_DUE_SQL = """
SELECT extract(epoch FROM min(next_attempt_at) - now()) AS seconds
FROM deliveries WHERE status = 'pending' AND NOT (id = ANY(%(busy)s::bigint[]))
"""


class Deliverer:
    """Delivers queued events to channels."""

    def __init__(self, ctx: Any, channels: ChannelStore) -> None:
        self.ctx = ctx
        self.channels = channels
        cfg = ctx.config
        self.max_attempts = int(getattr(cfg, "delivery_max_attempts", 8))
        self.backoff_base_s = float(getattr(cfg, "delivery_backoff_base_s", 2.0))
        self.backoff_max_s = float(getattr(cfg, "delivery_backoff_max_s", 600.0))
        self.max_retry_after_s = float(getattr(cfg, "delivery_max_retry_after_s", 3600.0))
        self.timeout_s = float(getattr(cfg, "delivery_timeout_s", 10.0))
        self.lease_s = self.timeout_s + float(getattr(cfg, "delivery_lease_margin_s", 30.0))
        self.concurrency = int(getattr(cfg, "delivery_concurrency", 8))
        self.poll_s = float(getattr(cfg, "delivery_poll_s", 5.0))
        self._wake = trio.Event()
        self._busy: set[int] = set()
        self._client: httpx.AsyncClient | None = None

    # -- the queue (runs in the event's transaction) ----------------------------------------

    def enqueue(self, conn: Any, appended: list[tuple[int, str, LifecycleEvent]]) -> None:
        """Queue the deliveries of appended events, ``(id, team_id, event)`` each (runs in their
        append transaction, in a thread; one statement however many)."""
        teams = [item for item in appended if item[1]]  # platform events (team '') have no channels
        if not teams:
            return
        conn.execute(
            "INSERT INTO deliveries (event_id, channel_id, team_id)"
            " SELECT e.id, c.id, c.team_id FROM unnest(%s::bigint[], %s::text[], %s::text[])"
            " AS e(id, team_id, name) JOIN channels c ON c.team_id = e.team_id AND e.name = ANY(c.events)"
            " ON CONFLICT DO NOTHING",
            ([i for i, _, _ in teams], [t for _, t, _ in teams], [ev.event for _, _, ev in teams]))

    # -- the loop -----------------------------------------------------------------------------

    @property
    def _db(self) -> Any:
        assert self.ctx.db is not None
        return self.ctx.db

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled."""
        limits = httpx.Limits(max_connections=self.concurrency * 2,
                              max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(limits=limits, follow_redirects=False) as client:
            self._client = client
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_events)
                task_status.started()
                await self._dispatch(nursery)

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        slots = trio.Semaphore(self.concurrency)
        while True:
            wake = self._wake = trio.Event()
            delay = self.poll_s
            if slots.value:
                try:
                    rows, next_due = await self._claim(slots.value)
                except Exception as exc:
                    log.warning("claiming deliveries failed", extra={"error": repr(exc)})
                    rows, next_due = [], None
                for row in rows:
                    await slots.acquire()
                    self._busy.add(int(row["id"]))
                    nursery.start_soon(self._deliver, row, slots)
                if next_due is not None:
                    delay = min(delay, max(next_due, 0.01))
            with trio.move_on_after(delay):
                await wake.wait()

    async def _claim(self, limit: int) -> tuple[list[dict[str, Any]], float | None]:
        busy = sorted(self._busy)

        def work(conn: Any) -> tuple[list[dict[str, Any]], float | None]:
            rows = list(conn.execute(CLAIM_SQL, {"busy": busy, "limit": limit,
                                                 "lease": self.lease_s}).fetchall())
            claimed = busy + [int(r["id"]) for r in rows]
            due = conn.execute(NEXT_DUE_SQL, {"busy": claimed}).fetchone()
            seconds = due["seconds"] if due else None
            return rows, (float(seconds) if seconds is not None else None)

        result: tuple[list[dict[str, Any]], float | None] = await self._db.run_with_connection(work)
        return result

    async def _follow_events(self) -> None:
        """Wake on appended events; drop the channels of deleted teams."""
        while True:
            try:
                async with self.ctx.bus.subscribe(EVENT_TOPIC, TEAM_DELETED_TOPIC) as events:
                    self._wake.set()  # anything queued while not subscribed
                    async for _topic, message in events:
                        if isinstance(message, TeamDeleted):
                            removed = await self.channels.delete_team(message.team_id)
                            if removed:
                                log.info("channels of a deleted team removed",
                                         extra={"team_id": message.team_id, "count": removed})
                        else:
                            self._wake.set()
            except Exception as exc:
                log.warning("event subscription failed; retrying", extra={"error": repr(exc)})
            await trio.sleep(self.poll_s)

    # -- one attempt -----------------------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Seconds before retrying after failed attempt number ``attempt`` (1-based), with jitter."""
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** max(0, attempt - 1))
        return delay * random.uniform(0.5, 1.0)

    async def _deliver(self, row: dict[str, Any], slots: trio.Semaphore) -> None:
        delivery_id, attempt = int(row["id"]), int(row["attempts"])
        try:
            result = await self._attempt(row)
            await self._record(row, result)
        except Exception as exc:  # the database is down: the lease brings the row back
            log.warning("recording a delivery attempt failed",
                        extra={"delivery_id": delivery_id, "attempt": attempt, "error": repr(exc)})
        finally:
            self._busy.discard(delivery_id)
            slots.release()
            self._wake.set()

    async def _attempt(self, row: dict[str, Any]) -> SendResult:
        channel_id, delivery_id = row["channel_id"], int(row["id"])
        config: dict[str, str] = {}
        try:
            config = self.channels.open_config(channel_id, row["config_sealed"], row["key_id"])
            event = _decode_event(row["body"])
            request = providers.build_request(row["provider"], config, event,
                                              key=f"{channel_id}.{delivery_id}",
                                              settings=self.channels.settings)
        except ConfigUnreadable as exc:
            return SendResult(ok=False, status_code=None, latency_ms=0,
                              error=f"config_unreadable: the channel config {exc}")
        except Exception as exc:
            log.exception("cannot build a delivery", extra={"delivery_id": delivery_id})
            return SendResult(ok=False, status_code=None, latency_ms=0,
                              error=f"internal error: {type(exc).__name__}")
        assert self._client is not None
        return await providers.send(self._client, request, timeout_s=self.timeout_s, config=config,
                                    allow_private=self.channels.settings.allow_private_urls)

    async def _record(self, row: dict[str, Any], result: SendResult) -> None:
        delivery_id, attempt = int(row["id"]), int(row["attempts"])
        if result.ok:
            status, delay = "delivered", 0.0
        elif result.retryable and attempt < self.max_attempts:
            status = "pending"
            if result.retry_after_s is not None:
                wanted = min(result.retry_after_s, self.max_retry_after_s)
                delay = wanted * random.uniform(1.0, 1.05)  # never earlier than asked
            else:
                delay = self.backoff(attempt)
        else:
            status, delay = "failed", 0.0

        def write(conn: Any) -> None:
            conn.execute(
                "INSERT INTO delivery_attempts (delivery_id, attempt, status_code, latency_ms, error)"
                " VALUES (%s, %s, %s, %s, %s)",
                (delivery_id, attempt, result.status_code, result.latency_ms, result.error))
            conn.execute(
                "UPDATE deliveries SET status = %s, last_error = %s,"
                " next_attempt_at = now() + make_interval(secs => %s),"
                " finished_at = CASE WHEN %s = 'pending' THEN NULL ELSE now() END WHERE id = %s",
                (status, result.error, delay, status, delivery_id))

        await self._db.transaction(write)
        extra = {"delivery_id": delivery_id, "channel_id": row["channel_id"], "attempt": attempt,
                 "status_code": result.status_code, "latency_ms": result.latency_ms}
        if status == "delivered":
            log.info("delivered", extra=extra)
        elif status == "pending":
            log.info("delivery attempt failed; retrying",
                     extra={**extra, "error": result.error, "retry_in_s": round(delay, 3)})
        else:
            log.warning("delivery failed", extra={**extra, "error": result.error})
