"""``GET /v1/events/stream`` and ``GET /v1/admin/events/stream`` (capsules reference, tag events):
lifecycle events as Server-Sent Events.

The team stream carries the events of the caller's active team (``X-API-Key``
or the session cookie). The admin stream carries every team's events and the
platform's own (team ``''``, e.g. a platform host going down); it needs a
platform admin's session (an API key gets 403 ``session_required``, anyone
else 403 ``forbidden``).

Frames (the reference's format; the ``data:`` line is the ``SSEEvent`` JSON)::

    id: 41
    event: connected
    data: {"event":"connected","timestamp":"2026-05-19T02:00:00Z"}

    id: 42
    event: capsule.create
    data: {"event":"capsule.create","outcome":"success",...}

    : keepalive

``id:`` is the event log's id (:mod:`dovecote.notifier.eventlog`: ids only
grow); the ``connected`` sentinel carries the position the stream starts
from, so a client that reconnects with the last ``id:`` it saw gets neither a
gap nor a duplicate. A ``: keepalive`` comment is written after
``DOVECOTE_SSE_KEEPALIVE_S`` (30 s) without a frame.

Where a stream starts: the ``Last-Event-ID`` header, else ``?after=``
(EventSource resends the URL it was built with, so the header, which is
newer, wins), clamped to the log's newest id; without either, the newest id
(the stream shows what happens from now on).

How it stays gap-free and duplicate-free:

1. a *follower* task subscribes to :data:`~dovecote.bus.messages.events.EVENT_TOPIC`
   first, and queues the live events the stream may see;
2. the stream then writes ``connected`` and replays the log after its
   position with :class:`~dovecote.bus.messages.events.ListEvents`, page by
   page;
3. then it writes the follower's events. Its position is the id of the last
   event written; anything at or below it is a duplicate (a replayed event
   that also arrived live) and is skipped. The follower sees every team's ids
   and flags a jump (the event plane drops under burst, and the first live
   event may follow events the replay did not see): the stream then reads
   the log up to that id before going on. At each keepalive it also reads one
   page of the log, which catches the tail of a burst that was dropped.

Slow clients: the follower hands events over through a queue of
``DOVECOTE_SSE_QUEUE_EVENTS`` (1024). When the queue is full the follower
stops, which releases its subscription, and the stream ends with a final::

    event: error
    data: {"event":"error","error":"...","metadata":{"reason":"slow_client"},...}

so the client reconnects with its ``Last-Event-ID`` and catches up from the
log at its own pace (a long replay on a busy platform can end the same way;
each reconnection gets further). The queued events are dropped at once: a client that
reads nothing at all holds only its socket buffers and the frames being
written until it reads or goes away. The same ``error`` frame (without an
``id:``, so the client's Last-Event-ID stays) ends a stream whose credential
stopped working (checked again every keepalive interval: reason
``unauthorized``) or whose notifier or bus went away (``unavailable``).

Why the follower runs in the app's nursery (Quart-Trio's, for the server's
lifetime) and not in a nursery of the response's generator: the generator
yields each frame to Quart, which writes it while the generator is
suspended, so a nursery spanning those yields would have the response writer
run inside its cancel scope. The generator cancels the follower when it ends,
and it ends when the client goes away (Quart cancels the request and closes
the generator). Quart-Trio cuts responses at 60 s unless ``response.timeout``
is None, which it is here.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
import trio
from quart import Response, request

from dovecote.bus import BusError
from dovecote.bus.messages.common import Principal
from dovecote.bus.messages.events import (
    EVENT_TOPIC,
    EventAppended,
    EventList,
    ListEvents,
)
from dovecote.gateway.calls import call, sse_response
from dovecote.gateway.edge import API_KEY_HEADER, SESSION_COOKIE
from dovecote.gateway.errors import ApiError, Error
from dovecote.gateway.state import GatewayState
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import now_rfc3339

log = get_logger("dovecote.gateway.events")

PAGE = 500
"""Events per ListEvents page (replay, gap fill, keepalive poll)."""
NEWEST = 1 << 62
"""``ListEvents(after=NEWEST)`` lists nothing and answers the log's newest id."""
BATCH_BYTES = 64 * 1024
"""Frames ready at once are written together, up to about this many bytes."""
MAX_ID_DIGITS = 18
KEEPALIVE = b": keepalive\n\n"
LAST_EVENT_ID = "Last-Event-ID"

_encode = msgspec.json.Encoder().encode


# -- frames (no I/O) -------------------------------------------------------------------


class StreamNotice(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The ``data:`` of the ``connected`` sentinel and of the final ``error`` frame."""

    event: str
    timestamp: str
    error: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


def sse_frame(name: str, data: bytes, event_id: int | None = None) -> bytes:
    """One SSE message: ``id:`` (when given), ``event:`` and one ``data:`` line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\n".encode() + b"data: " + data + b"\n\n"


def event_frame(appended: EventAppended) -> bytes:
    """The frame of one logged event."""
    return sse_frame(appended.event.event, _encode(appended.event), appended.id)


def connected_frame(position: int) -> bytes:
    """The sentinel every stream starts with; its id is where the stream starts."""
    return sse_frame("connected", _encode(StreamNotice(event="connected", timestamp=now_rfc3339())),
                     position)


def error_frame(reason: str, message: str) -> bytes:
    """The last frame of a stream the gateway ends (no ``id:``: the client's position stays)."""
    return sse_frame("error", _encode(StreamNotice(
        event="error", timestamp=now_rfc3339(), error=message, metadata={"reason": reason})))


def parse_position(header: str | None, query: str | None) -> int | None:
    """The resume position from ``Last-Event-ID`` or ``?after=`` (the header wins), or 400."""
    for raw, what in ((header, "Last-Event-ID"), (query, "after")):
        if raw is None or (what == "Last-Event-ID" and not raw.strip()):
            continue  # EventSource sends an empty Last-Event-ID before its first id
        text = raw.strip()
        if not text.isascii() or not text.isdigit() or len(text) > MAX_ID_DIGITS:
            raise ApiError(400, "invalid_request", f"{what} must be an event id (a non-negative integer)")
        return int(text)
    return None


# -- what a stream has written (no I/O) ---------------------------------------------------


class Live(NamedTuple):
    """One item of a follower's queue: an event the stream may see, and/or an id jump."""

    id: int
    gap: bool
    """The follower did not receive every id before this one: read the log up to it."""
    appended: EventAppended | None


class Position:
    """The id of the last event a stream wrote, and which events it may write."""

    def __init__(self, team_id: str, last_id: int) -> None:
        self.team_id = team_id
        """The team whose events the stream carries; ``''``: every team (admin)."""
        self.last_id = last_id

    def visible(self, appended: EventAppended) -> bool:
        return not self.team_id or appended.team_id == self.team_id

    def take(self, appended: EventAppended) -> bool:
        """Whether to write ``appended`` (not yet written, visible); if so, it is now written."""
        if appended.id <= self.last_id or not self.visible(appended):
            return False
        self.last_id = appended.id
        return True

    def needs_fill(self, live: Live) -> bool:
        """Whether the log must be read before ``live``: ids before it may have been missed."""
        return live.gap and live.id > self.last_id + 1


def follow(team_id: str) -> Callable[[int | None, EventAppended], Live | None]:
    """The follower's filter: ``(previous id seen, event)`` → the queue item, or None to skip.

    Every team's ids pass by, so a jump in them is a gap (the first id always
    counts as one: what came before it is the replay's business).
    """

    def item(seen: int | None, appended: EventAppended) -> Live | None:
        if seen is not None and appended.id <= seen:
            return None  # published out of order by another notifier: already covered
        gap = seen is None or appended.id > seen + 1
        visible = not team_id or appended.team_id == team_id
        if not (gap or visible):
            return None
        return Live(appended.id, gap, appended if visible else None)

    return item


# -- the follower task --------------------------------------------------------------------


class Follower:
    """Follows the event topic for one stream and queues what it may see, until cancelled.

    ``ended`` says why it stopped on its own: ``slow_client`` (the queue was
    full), ``unavailable`` (the subscription failed).
    """

    def __init__(self, bus: Any, team_id: str, queue_size: int) -> None:
        self.bus = bus
        self.filter = follow(team_id)
        self.send, self.receive = trio.open_memory_channel[Live](queue_size)
        self.scope = trio.CancelScope()
        self.ended: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope, self.send:
            async with self.bus.subscribe(EVENT_TOPIC) as events:
                task_status.started()
                try:
                    self.ended = await self.pump(events)
                except BusError as exc:
                    log.info("event stream subscription ended", extra={"error": repr(exc)})
                    self.ended = "unavailable"
                except Exception:  # never into the app's nursery: that would stop the server
                    log.exception("event stream follower failed")
                    self.ended = "unavailable"

    async def pump(self, events: AsyncIterable[tuple[str, Any]]) -> str:
        """Queue items from ``events`` until the queue overflows or the stream is gone."""
        seen: int | None = None
        async for _topic, message in events:
            if not isinstance(message, EventAppended):
                continue
            item = self.filter(seen, message)
            seen = message.id if seen is None else max(seen, message.id)
            if item is None:
                continue
            try:
                self.send.send_nowait(item)
            except trio.WouldBlock:
                self.drop_queued()
                return "slow_client"
            except trio.BrokenResourceError:
                return "closed"
        return "unavailable"

    def drop_queued(self) -> None:
        """Free what the queue holds: a cut-off stream writes none of it."""
        while True:
            try:
                self.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return


# -- one stream ---------------------------------------------------------------------------


class EventStream:
    """The frames of one client's stream (see the module docstring for the order)."""

    def __init__(self, *, state: GatewayState, team_id: str, start: int,
                 check_access: Callable[[], Awaitable[None]]) -> None:
        self.state = state
        self.position = Position(team_id, start)
        self.follower = Follower(state.bus, team_id, state.config.sse_queue_events)
        self.check_access = check_access
        self.keepalive_s = state.config.sse_keepalive_s

    async def read_log(self) -> tuple[bytes, bool]:
        """One page of the log after the position: (frames, whether there may be more)."""
        reply: EventList = await call(self.state, "notifier", ListEvents(
            team_id=self.position.team_id, after=self.position.last_id, limit=PAGE))
        frames = b"".join(event_frame(e) for e in reply.events if self.position.take(e))
        return frames, len(reply.events) >= PAGE

    async def frames(self) -> AsyncIterator[bytes]:
        """The response body: sentinel, replay, live events, keepalives, maybe a final error."""
        follower = self.follower
        try:
            try:
                await self.state.app.nursery.start(follower.run)
            except BusError as exc:
                yield error_frame("unavailable", f"cannot follow events: {exc}")
                return
            yield connected_frame(self.position.last_id)
            next_check = trio.current_time() + self.keepalive_s
            try:
                more = True
                while more:  # the replay
                    chunk, more = await self.read_log()
                    if chunk:
                        yield chunk
                last_write = trio.current_time()
                while True:
                    if follower.ended == "slow_client":
                        log.info("event stream client too slow",
                                 extra={"team_id": self.position.team_id})
                        yield error_frame("slow_client", (
                            f"more than {self.state.config.sse_queue_events} events were waiting "
                            "for this client; reconnect with Last-Event-ID to resume"))
                        return
                    if trio.current_time() >= next_check:
                        refusal = await self._refused()
                        if refusal is not None:
                            yield error_frame("unauthorized", refusal)
                            return
                        next_check = trio.current_time() + self.keepalive_s
                    live, over = await self._next(min(last_write + self.keepalive_s, next_check))
                    if over:
                        if follower.ended == "slow_client":
                            continue
                        yield error_frame("unavailable", "the event feed ended")
                        return
                    if live is None:
                        if trio.current_time() >= last_write + self.keepalive_s:
                            yield KEEPALIVE + await self._poll()
                            last_write = trio.current_time()
                        continue
                    # Write what is ready together, taking from the queue only as frames go
                    # out (memory: the queue and one batch).
                    out: list[bytes] = []
                    size = 0
                    while live is not None:
                        if self.position.needs_fill(live):
                            if out:
                                yield b"".join(out)
                                out, size = [], 0
                                last_write = trio.current_time()
                            more = True
                            while more and self.position.last_id < live.id:
                                chunk, more = await self.read_log()
                                if chunk:
                                    yield chunk
                                    last_write = trio.current_time()
                        if live.appended is not None and self.position.take(live.appended):
                            frame = event_frame(live.appended)
                            out.append(frame)
                            size += len(frame)
                        live = None
                        if size < BATCH_BYTES:
                            try:
                                live = follower.receive.receive_nowait()
                            except (trio.WouldBlock, trio.EndOfChannel):
                                pass
                    if out:
                        yield b"".join(out)
                        last_write = trio.current_time()
            except ApiError as exc:  # the notifier is gone
                yield error_frame("unavailable", exc.message)
        finally:
            follower.scope.cancel()
            follower.receive.close()

    async def _next(self, deadline: float) -> tuple[Live | None, bool]:
        """The next queued item by ``deadline``: (item or None, whether the follower stopped)."""
        with trio.move_on_at(deadline):
            try:
                return await self.follower.receive.receive(), False
            except trio.EndOfChannel:
                return None, True
        return None, False

    async def _poll(self) -> bytes:
        """One page of the log at a keepalive: the tail of a burst the event plane dropped."""
        try:
            chunk, _ = await self.read_log()
        except ApiError as exc:
            log.info("event stream poll failed", extra={"error": exc.message})
            return b""
        return chunk

    async def _refused(self) -> str | None:
        """Why the stream's credential no longer works, or None (auth unreachable counts as fine)."""
        try:
            await self.check_access()
        except ApiError as exc:
            if exc.status in (401, 403):
                return exc.message
        return None


# -- routes ---------------------------------------------------------------------------------


class StreamQuery(msgspec.Struct, kw_only=True):
    """Query of the event streams (the ``Last-Event-ID`` header takes precedence)."""

    after: int | None = None


def register(state: GatewayState) -> None:
    """Add the event stream routes."""
    api, app, edge = state.api, state.app, state.edge

    async def open_stream(team_id: str, check_access: Callable[[], Awaitable[None]]) -> Response:
        wanted = parse_position(request.headers.get(LAST_EVENT_ID), request.args.get("after"))
        newest: EventList = await call(state, "notifier", ListEvents(team_id=team_id, after=NEWEST,
                                                                     limit=1))
        start = newest.last_id if wanted is None else min(wanted, newest.last_id)
        stream = EventStream(state=state, team_id=team_id, start=start, check_access=check_access)
        return sse_response(stream.frames())

    def credential_checker(actor: Principal, *, admin: bool) -> Callable[[], Awaitable[None]]:
        """Resolve the request's credential again later (outside the request context)."""
        key = None if admin else request.headers.get(API_KEY_HEADER)
        sid = request.cookies.get(SESSION_COOKIE, "")

        async def check() -> None:
            if key:
                current = await edge.resolve_api_key(key)
            else:
                current = (await edge.resolve_session(sid)).principal
            if admin and not current.is_admin:
                raise ApiError(403, "forbidden", "platform admin access required")
            if not admin and current.team_id != actor.team_id:
                raise ApiError(403, "forbidden", "the active team of this session changed")

        return check

    @api.route(app, "GET", "/v1/events/stream", summary="Real-time lifecycle event stream",
               tags=["events"], query=StreamQuery, responses={200: None, 401: Error}, streams=True)
    async def stream_events() -> Response:
        actor: Principal = await edge.authenticate()
        if not actor.team_id:
            raise ApiError(403, "forbidden", "an active team is required")
        return await open_stream(actor.team_id, credential_checker(actor, admin=False))

    @api.route(app, "GET", "/v1/admin/events/stream", summary="Admin SSE event stream (all teams)",
               tags=["admin", "events"], query=StreamQuery,
               responses={200: None, 401: Error, 403: Error}, streams=True)
    async def admin_stream_events() -> Response:
        actor: Principal = await edge.authenticate(session_only=True)
        if not actor.is_admin:
            raise ApiError(403, "forbidden", "platform admin access required")
        return await open_stream("", credential_checker(actor, admin=True))
