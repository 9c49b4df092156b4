"""Agent runs and live sessions: ``/api/system/health``, ``/api/scenarios``, ``/api/runs*``,
``/api/live-sessions*``, ``/api/memory*``, ``/api/history*`` (the agent runs reference, tag ``runs``).

Every route takes ``X-API-Key`` or the session cookie (with CSRF for changes)
and asks the ``runs`` service; every record is the caller's team's. The
reference's plain error bodies (``{"error": "Run not found."}``,
``{"error": "Unknown scenario: x"}``, ``{"error": "No pending confirmation."}``)
travel in a refusal's ``details["wire"]`` and are sent as they are; other
refusals take the platform's ``{"error": {"code", "message"}}``.

Event streams (``/api/runs/:id/events``, ``/api/live-sessions/:id/events``)
are SSE frames ``id: <n>`` + ``data: <event json>`` with no ``event:`` line:
the full history first, then live events (long polls of ``runs.wait_events``);
``Last-Event-ID`` resumes after an event, so a reconnecting client gets each
event once. A run's stream ends after its ``final`` event.

The plain routes are the table :data:`ROUTES` (:mod:`dovecote.gateway.routing`);
only the three streams are hand-written.

``/api/live-sessions/:id/screen-stream``: one producer per session takes a
JPEG frame about twice a second while at least one client listens; each
client has a one-frame slot, so a slow client skips frames and one that has
not taken a frame for :data:`STALL_S` is dropped without delaying the others.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio
from quart import Response, request

from dovecote.bus.messages import runs as r
from dovecote.gateway.calls import decode_json, sse_response
from dovecote.gateway.errors import ApiError, Error
from dovecote.gateway.openapi import AnyOf
from dovecote.gateway.routes.desktops import ErrorMessage, WireError, ask_wired, wired, wired_send
from dovecote.gateway.routing import Call, Family, Route, path_id, register_routes
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import DovecoteError
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.gateway.runs")

SERVICE = "runs"
TAGS = ["runs"]
MAX_ID = 64
FRAME_INTERVAL_S = 0.5
STALL_S = 3.0
WAIT_S = 10.0


class RunDetail(msgspec.Struct, kw_only=True):
    run: r.RunRecord
    events: list[r.Event]


class LiveDetail(msgspec.Struct, kw_only=True):
    session: r.LiveSession
    events: list[r.Event]


class Observed(msgspec.Struct, kw_only=True):
    session: r.LiveSession
    heartbeat: dict[str, Any]
    windows: list[dict[str, Any]]
    screenshot: dict[str, Any]


class Deleted(msgspec.Struct, kw_only=True):
    deleted: bool


class HistoryPage(msgspec.Struct, kw_only=True):
    items: list[r.HistoryItem]
    total: int
    limit: int
    offset: int


class HistoryRecord(msgspec.Struct, kw_only=True):
    type: str
    record: dict[str, Any]
    events: list[r.Event]


class InputError(msgspec.Struct, kw_only=True):
    """A run whose input fails its scenario's schema: the message names the field."""

    error: str
    field: str


class HistoryQuery(msgspec.Struct, kw_only=True):
    limit: int = 20
    offset: int = 0


PLAIN = {404: ErrorMessage}


async def ask(state: GatewayState, message: Any, timeout_s: float = 30.0) -> Any:
    return await ask_wired(state, SERVICE, message, timeout_s)


def _id(value: str, what: str) -> str:
    return path_id(value, WireError(404, {"error": f"{what} not found."}))


def sse(event: r.Event) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (event.id, msgspec.json.encode(event))


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
    try:
        return max(0, int(raw))
    except ValueError:
        raise ApiError(400, "invalid_request", "Last-Event-ID must be an event id") from None


def event_stream(
    state: GatewayState, actor: Any, kind: r.SubjectKind, subject_id: str, after: int
) -> Response:
    async def frames() -> AsyncIterator[bytes]:
        position = after
        yield b": stream\n\n"
        while True:
            try:
                batch: r.EventBatch = await state.bus.request(
                    SERVICE,
                    r.WaitEvents(
                        actor=actor, kind=kind, subject_id=subject_id, after=position, wait_s=WAIT_S
                    ),
                    timeout=WAIT_S + 10,
                )
            except DovecoteError as exc:
                yield (
                    b"data: %s\n\n"
                    % json.dumps({"type": "error", "level": "error", "message": str(exc)}).encode()
                )
                return
            if batch.events:
                yield b"".join(sse(e) for e in batch.events)
                position = batch.events[-1].id
            elif batch.done:
                return
            else:
                yield b": keepalive\n\n"

    return sse_response(frames())


@dataclass(eq=False)
class Listener:
    send: trio.MemorySendChannel[bytes]
    last_taken: float


@dataclass
class Screen:
    """One live session's frame producer and its listeners."""

    listeners: set[Listener] = field(default_factory=set)
    running: bool = False
    dropped: int = 0


class ScreenStreams:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.screens: dict[str, Screen] = {}

    def statistics(self) -> dict[str, Any]:
        return {k: {"listeners": len(v.listeners), "dropped": v.dropped} for k, v in self.screens.items()}

    async def produce(self, actor: Any, session_id: str, screen: Screen) -> None:
        try:
            while screen.listeners:
                started = trio.current_time()
                try:
                    frame: r.FrameReply = await self.state.bus.request(
                        SERVICE, r.GetFrame(actor=actor, session_id=session_id), timeout=15.0
                    )
                    data = (
                        b"data: "
                        + msgspec.json.encode(
                            {
                                "timestamp": frame.timestamp,
                                "width": frame.width,
                                "height": frame.height,
                                "image": base64.b64encode(frame.jpeg).decode(),
                            }
                        )
                        + b"\n\n"
                    )
                except DovecoteError as exc:
                    log.info("no screen frame", extra={"session_id": session_id, "error": str(exc)})
                    data = b": no frame\n\n"
                now = trio.current_time()
                for listener in list(screen.listeners):
                    try:
                        listener.send.send_nowait(data)
                        listener.last_taken = now
                    except trio.WouldBlock:
                        if now - listener.last_taken > STALL_S:
                            screen.listeners.discard(listener)
                            screen.dropped += 1
                            listener.send.close()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        screen.listeners.discard(listener)
                await trio.sleep(max(0.0, FRAME_INTERVAL_S - (trio.current_time() - started)))
        finally:
            screen.running = False

    def open(self, actor: Any, session_id: str) -> Response:
        screen = self.screens.setdefault(session_id, Screen())
        send, receive = trio.open_memory_channel[bytes](1)
        listener = Listener(send=send, last_taken=trio.current_time())
        screen.listeners.add(listener)
        if not screen.running:
            screen.running = True
            self.state.app.nursery.start_soon(self.produce, actor, session_id, screen)

        async def frames() -> AsyncIterator[bytes]:
            try:
                yield b": screen\n\n"
                async for data in receive:
                    yield data
            finally:
                screen.listeners.discard(listener)
                receive.close()

        return sse_response(frames())


async def _optional_json(body_type: Any) -> Any:
    """A body that may be empty (or blank): its defaults then."""
    raw = await request.get_data(cache=False)
    return decode_json(raw, body_type) if raw.strip() else body_type()


def _history_page(c: Call) -> r.ListHistory:
    query: HistoryQuery = c.query
    if not 1 <= query.limit <= 100 or query.offset < 0:
        raise ApiError(400, "invalid_request", "limit is 1 to 100 and offset at least 0")
    return r.ListHistory(actor=c.actor, limit=query.limit, offset=query.offset)


def _app_name(value: str) -> str:
    if not value or len(value) > 128 or not value.isprintable():
        raise WireError(404, {"error": "App profile not found."})
    return value


async def _memory_app(c: Call) -> r.AppProfile:
    name = _app_name(c.params["name"])
    reply: r.MemoryList = await ask(c.state, r.ListMemory(actor=c.actor, scope="app", app=name))
    return r.AppProfile(name=name, entries=reply.entries)


def _run(c: Call) -> str:
    return _id(c.params["id"], "Run")


def _live_id(value: str) -> str:
    return _id(value, "Live session")


def _live(c: Call) -> str:
    return _live_id(c.params["id"])


def _item(c: Call) -> str:
    return _id(c.params["id"], "History item")


RUNS = Family(tags=TAGS, service=SERVICE, send=wired_send(SERVICE), wrap=wired, timeout_s=30.0)
"""Every route: API key or session; the reference's plain errors sent as they are (:func:`ask`)."""

ROUTES = [
    Route(method="GET", path="/api/system/health", name="system_health",
          summary="Machine, auth, scenario count and model proxy health", response=r.SystemHealth,
          message=lambda c: r.GetSystemHealth(actor=c.actor), timeout_s=15.0,
          reply=lambda reply: reply.health),
    Route(method="GET", path="/api/scenarios", name="list_scenarios",
          summary="The scenarios (built in and configured)", response=list[r.Scenario],
          message=lambda c: r.ListScenarios(actor=c.actor), reply=lambda reply: reply.scenarios),
    Route(method="GET", path="/api/runs", name="list_runs", summary="Your team's runs, newest first",
          response=list[r.RunRecord], message=lambda c: r.ListRuns(actor=c.actor),
          reply=lambda reply: reply.runs),
    Route(method="POST", path="/api/runs", name="create_run", summary="Start a scenario run (202 Draft)",
          request=r.CreateRunBody, response=r.RunRecord, status=202,
          responses={400: AnyOf(ErrorMessage, InputError, Error)},
          descriptions={400: "Unknown scenario: <id>; Invalid input: input.<field>: ...; a bad body"},
          message=lambda c: r.CreateRun(actor=c.actor, body=c.body), reply=lambda reply: reply.run),
    Route(method="GET", path="/api/runs/{id}", name="get_run", summary="A run and its events",
          response=RunDetail, responses=PLAIN, message=lambda c: r.GetRun(actor=c.actor, run_id=_run(c)),
          reply=lambda reply: RunDetail(run=reply.run, events=reply.events)),
    Route(method="POST", path="/api/runs/{id}/stop", name="stop_run",
          summary="Stop a run (Stopped.ByOperator)", response=r.RunRecord, responses=PLAIN,
          message=lambda c: r.StopRun(actor=c.actor, run_id=_run(c)), reply=lambda reply: reply.run),
    Route(method="POST", path="/api/runs/{id}/retry", name="retry_run",
          summary="Start a new run with the same scenario and input", response=r.RunRecord,
          status=202, responses=PLAIN,
          message=lambda c: r.RetryRun(actor=c.actor, run_id=_run(c)), reply=lambda reply: reply.run),
    # /api/runs/{id}/events: an SSE stream, hand-written in register()
    Route(method="GET", path="/api/runs/{id}/replay", name="run_replay",
          summary="The replay archive (application/zip)", responses=PLAIN,
          message=lambda c: r.GetReplay(actor=c.actor, run_id=_run(c)), timeout_s=90.0,
          reply=lambda reply: Response(
              reply.data, status=200, content_type="application/zip",
              headers={"Content-Disposition": f'attachment; filename="{reply.filename}"'})),
    # -- live sessions ---------------------------------------------------------------------------
    Route(method="GET", path="/api/live-sessions", name="list_live_sessions",
          summary="Your team's live sessions", response=list[r.LiveSession],
          message=lambda c: r.ListLive(actor=c.actor), reply=lambda reply: reply.sessions),
    Route(method="POST", path="/api/live-sessions", name="create_live_session",
          summary="Create a live session", request=r.CreateLiveBody, parse=_optional_json,
          response=r.LiveSession, status=201,
          message=lambda c: r.CreateLive(actor=c.actor, body=c.body), reply=lambda reply: reply.session),
    Route(method="GET", path="/api/live-sessions/{id}", name="get_live_session",
          summary="A live session and its events", response=LiveDetail, responses=PLAIN,
          message=lambda c: r.GetLive(actor=c.actor, session_id=_live(c)),
          reply=lambda reply: LiveDetail(session=reply.session, events=reply.events)),
    # /api/live-sessions/{id}/events: an SSE stream, hand-written in register()
    Route(method="POST", path="/api/live-sessions/{id}/observe", name="observe_live_session",
          summary="Capture the desktop's state", response=Observed,
          responses={409: ErrorMessage, **PLAIN}, timeout_s=60.0,
          message=lambda c: r.ObserveLive(actor=c.actor, session_id=_live(c)),
          reply=lambda reply: Observed(session=reply.session, heartbeat=reply.heartbeat,
                                       windows=reply.windows, screenshot=reply.screenshot)),
    Route(method="POST", path="/api/live-sessions/{id}/commands", name="live_session_command",
          summary="Submit one instruction", ids={"id": _live_id}, request=r.CommandBody,
          response=r.LiveSession, status=202,
          responses={400: AnyOf(ErrorMessage, Error), 409: ErrorMessage, **PLAIN},
          message=lambda c: r.LiveCommand(actor=c.actor, session_id=_live(c), body=c.body),
          reply=lambda reply: reply.session),
    Route(method="POST", path="/api/live-sessions/{id}/confirm", name="confirm_live_session",
          summary="Resolve the pending confirmation", ids={"id": _live_id}, request=r.ConfirmBody,
          response=r.LiveSession,
          responses={400: AnyOf(ErrorMessage, Error), **PLAIN},
          message=lambda c: r.ConfirmLive(actor=c.actor, session_id=_live(c), body=c.body),
          reply=lambda reply: reply.session),
    Route(method="POST", path="/api/live-sessions/{id}/stop", name="stop_live_session",
          summary="Stop the current instruction", response=r.LiveSession, responses=PLAIN,
          message=lambda c: r.StopLive(actor=c.actor, session_id=_live(c)),
          reply=lambda reply: reply.session),
    # /api/live-sessions/{id}/screen-stream: an SSE stream, hand-written in register()
    # -- memory ------------------------------------------------------------------------------------
    Route(method="GET", path="/api/memory/global", name="global_memory", summary="Global memory entries",
          response=list[r.MemoryEntry], message=lambda c: r.ListMemory(actor=c.actor, scope="global"),
          reply=lambda reply: reply.entries),
    Route(method="GET", path="/api/memory/apps", name="memory_apps", summary="App profiles",
          response=list[r.AppProfile], message=lambda c: r.ListApps(actor=c.actor),
          reply=lambda reply: reply.apps),
    Route(method="GET", path="/api/memory/apps/{name}", name="memory_app", summary="One app profile",
          response=r.AppProfile, responses=PLAIN,
          handle=_memory_app),
    Route(method="POST", path="/api/memory", name="create_memory", summary="Create a memory entry",
          request=r.CreateMemoryBody, response=r.MemoryEntry, status=201,
          responses={400: AnyOf(ErrorMessage, Error)},
          message=lambda c: r.CreateMemory(actor=c.actor, body=c.body), reply=lambda reply: reply.entry),
    Route(method="DELETE", path="/api/memory/{id}", name="delete_memory",
          summary="Delete a memory entry", response=Deleted, responses=PLAIN,
          message=lambda c: r.DeleteMemory(actor=c.actor, entry_id=_id(c.params["id"], "Memory entry")),
          reply=lambda reply: Deleted(deleted=True)),
    # -- history -----------------------------------------------------------------------------------
    Route(method="GET", path="/api/history", name="list_history",
          summary="Runs and live sessions, newest first", query=HistoryQuery, response=HistoryPage,
          message=_history_page,
          reply=lambda reply: HistoryPage(items=reply.items, total=reply.total, limit=reply.limit,
                                          offset=reply.offset)),
    Route(method="GET", path="/api/history/{id}", name="get_history",
          summary="One run or live session", response=HistoryRecord, responses=PLAIN,
          message=lambda c: r.GetHistory(actor=c.actor, item_id=_item(c)),
          reply=lambda reply: HistoryRecord(type=reply.kind, record=reply.record, events=reply.events)),
    Route(method="DELETE", path="/api/history/{id}", name="delete_history",
          summary="Delete a run or live session", response=Deleted,
          responses={409: ErrorMessage, **PLAIN},
          message=lambda c: r.DeleteHistory(actor=c.actor, item_id=_item(c)),
          reply=lambda reply: Deleted(deleted=True)),
]


def register(state: GatewayState) -> None:
    """Add the agent runs, live sessions, memory, history and system health routes."""
    api, app, edge = state.api, state.app, state.edge
    screens = ScreenStreams(state)
    register_routes(state, RUNS, ROUTES)

    # -- the streams: hand-written -------------------------------------------------------------

    def subject_events(kind: r.SubjectKind, what: str, path: str, summary: str,
                       get: Callable[[Any, str], Any]) -> None:
        async def view(id: str) -> Response:
            actor = await edge.authenticate()
            subject_id = _id(id, what)
            after = _last_event_id()
            await ask(state, get(actor, subject_id))
            return event_stream(state, actor, kind, subject_id, after)

        view.__name__ = "run_events" if kind == "run" else "live_session_events"
        api.route(app, "GET", path, summary=summary, tags=TAGS, responses={200: None, **PLAIN},
                  streams=True)(wired(view))

    subject_events("run", "Run", "/api/runs/{id}/events", "SSE: the run's events (history, then live)",
                   lambda actor, run_id: r.GetRun(actor=actor, run_id=run_id))
    subject_events("live", "Live session", "/api/live-sessions/{id}/events",
                   "SSE: the live session's events",
                   lambda actor, session_id: r.GetLive(actor=actor, session_id=session_id))

    @api.route(app, "GET", "/api/live-sessions/{id}/screen-stream",
               summary="SSE: JPEG frames about 2 per second", tags=TAGS,
               responses={200: None, **PLAIN}, streams=True)
    @wired
    async def live_screen_stream(id: str) -> Response:
        actor = await edge.authenticate()
        session_id = _id(id, "Live session")
        await ask(state, r.GetLive(actor=actor, session_id=session_id))
        return screens.open(actor, session_id)
