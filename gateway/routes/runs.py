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

``/api/live-sessions/:id/screen-stream``: one producer per session takes a
JPEG frame about twice a second while at least one client listens; each
client has a one-frame slot, so a slow client skips frames and one that has
not taken a frame for :data:`STALL_S` is dropped without delaying the others.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio
from quart import Response, request

from dovecote.bus.messages import runs as r
from dovecote.gateway.calls import decode_json, json_response, parse_body, parse_query
from dovecote.gateway.errors import ApiError, Error, api_error
from dovecote.gateway.openapi import AnyOf
from dovecote.gateway.routes.desktops import ErrorMessage, WireError, wired
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import DovecoteError, ServiceError
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
    try:
        return await state.bus.request(SERVICE, message, timeout=timeout_s)
    except ServiceError as exc:
        wire = (exc.details or {}).get("wire")
        if wire is not None:
            raise WireError(exc.status, wire) from None
        raise api_error(exc, SERVICE) from None
    except DovecoteError as exc:
        raise api_error(exc, SERVICE) from None


def _id(value: str, what: str) -> str:
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise WireError(404, {"error": f"{what} not found."})
    return value


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

    response = Response(
        frames(),
        status=200,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.timeout = None
    return response


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

        response = Response(
            frames(),
            status=200,
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        response.timeout = None
        return response


def register(state: GatewayState) -> None:
    """Add the agent runs, live sessions, memory, history and system health routes."""
    api, app, edge = state.api, state.app, state.edge
    screens = ScreenStreams(state)

    @api.route(
        app,
        "GET",
        "/api/system/health",
        summary="Machine, auth, scenario count and model proxy health",
        tags=TAGS,
        responses={200: r.SystemHealth},
    )
    @wired
    async def system_health() -> Response:
        actor = await edge.authenticate()
        reply: r.HealthReply = await ask(state, r.GetSystemHealth(actor=actor), 15.0)
        return json_response(reply.health)

    @api.route(
        app,
        "GET",
        "/api/scenarios",
        summary="The scenarios (built in and configured)",
        tags=TAGS,
        responses={200: list[r.Scenario]},
    )
    @wired
    async def list_scenarios() -> Response:
        actor = await edge.authenticate()
        reply: r.ScenarioList = await ask(state, r.ListScenarios(actor=actor))
        return json_response(reply.scenarios)

    @api.route(
        app,
        "GET",
        "/api/runs",
        summary="Your team's runs, newest first",
        tags=TAGS,
        responses={200: list[r.RunRecord]},
    )
    @wired
    async def list_runs() -> Response:
        actor = await edge.authenticate()
        reply: r.RunList = await ask(state, r.ListRuns(actor=actor))
        return json_response(reply.runs)

    @api.route(
        app,
        "POST",
        "/api/runs",
        summary="Start a scenario run (202 Draft)",
        tags=TAGS,
        request=r.CreateRunBody,
        responses={202: r.RunRecord, 400: AnyOf(ErrorMessage, InputError, Error)},
        descriptions={400: "Unknown scenario: <id>; Invalid input: input.<field>: ...; a bad body"},
    )
    @wired
    async def create_run() -> Response:
        actor = await edge.authenticate()
        body = await parse_body(r.CreateRunBody)
        reply: r.RunReply = await ask(state, r.CreateRun(actor=actor, body=body))
        return json_response(reply.run, 202)

    @api.route(
        app,
        "GET",
        "/api/runs/{id}",
        summary="A run and its events",
        tags=TAGS,
        responses={200: RunDetail, **PLAIN},
    )
    @wired
    async def get_run(id: str) -> Response:
        actor = await edge.authenticate()
        reply: r.RunDetail = await ask(state, r.GetRun(actor=actor, run_id=_id(id, "Run")))
        return json_response(RunDetail(run=reply.run, events=reply.events))

    @api.route(
        app,
        "POST",
        "/api/runs/{id}/stop",
        summary="Stop a run (Stopped.ByOperator)",
        tags=TAGS,
        responses={200: r.RunRecord, **PLAIN},
    )
    @wired
    async def stop_run(id: str) -> Response:
        actor = await edge.authenticate()
        reply: r.RunReply = await ask(state, r.StopRun(actor=actor, run_id=_id(id, "Run")))
        return json_response(reply.run)

    @api.route(
        app,
        "POST",
        "/api/runs/{id}/retry",
        summary="Start a new run with the same scenario and input",
        tags=TAGS,
        responses={202: r.RunRecord, **PLAIN},
    )
    @wired
    async def retry_run(id: str) -> Response:
        actor = await edge.authenticate()
        reply: r.RunReply = await ask(state, r.RetryRun(actor=actor, run_id=_id(id, "Run")))
        return json_response(reply.run, 202)

    @api.route(
        app,
        "GET",
        "/api/runs/{id}/events",
        summary="SSE: the run's events (history, then live)",
        tags=TAGS,
        responses={200: None, **PLAIN},
    )
    @wired
    async def run_events(id: str) -> Response:
        actor = await edge.authenticate()
        run_id = _id(id, "Run")
        after = _last_event_id()
        await ask(state, r.GetRun(actor=actor, run_id=run_id))
        return event_stream(state, actor, "run", run_id, after)

    @api.route(
        app,
        "GET",
        "/api/runs/{id}/replay",
        summary="The replay archive (application/zip)",
        tags=TAGS,
        responses={200: None, **PLAIN},
    )
    @wired
    async def run_replay(id: str) -> Response:
        actor = await edge.authenticate()
        reply: r.ReplayReply = await ask(state, r.GetReplay(actor=actor, run_id=_id(id, "Run")), 90.0)
        return Response(
            reply.data,
            status=200,
            content_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{reply.filename}"'},
        )

    # -- live sessions ---------------------------------------------------------------------------

    @api.route(
        app,
        "GET",
        "/api/live-sessions",
        summary="Your team's live sessions",
        tags=TAGS,
        responses={200: list[r.LiveSession]},
    )
    @wired
    async def list_live_sessions() -> Response:
        actor = await edge.authenticate()
        reply: r.LiveList = await ask(state, r.ListLive(actor=actor))
        return json_response(reply.sessions)

    @api.route(
        app,
        "POST",
        "/api/live-sessions",
        summary="Create a live session",
        tags=TAGS,
        request=r.CreateLiveBody,
        responses={201: r.LiveSession},
    )
    @wired
    async def create_live_session() -> Response:
        actor = await edge.authenticate()
        raw = await request.get_data(cache=False)
        body = decode_json(raw, r.CreateLiveBody) if raw.strip() else r.CreateLiveBody()
        reply: r.LiveReply = await ask(state, r.CreateLive(actor=actor, body=body))
        return json_response(reply.session, 201)

    @api.route(
        app,
        "GET",
        "/api/live-sessions/{id}",
        summary="A live session and its events",
        tags=TAGS,
        responses={200: LiveDetail, **PLAIN},
    )
    @wired
    async def get_live_session(id: str) -> Response:
        actor = await edge.authenticate()
        reply: r.LiveDetail = await ask(state, r.GetLive(actor=actor, session_id=_id(id, "Live session")))
        return json_response(LiveDetail(session=reply.session, events=reply.events))

    @api.route(
        app,
        "GET",
        "/api/live-sessions/{id}/events",
        summary="SSE: the live session's events",
        tags=TAGS,
        responses={200: None, **PLAIN},
    )
    @wired
    async def live_session_events(id: str) -> Response:
        actor = await edge.authenticate()
        session_id = _id(id, "Live session")
        after = _last_event_id()
        await ask(state, r.GetLive(actor=actor, session_id=session_id))
        return event_stream(state, actor, "live", session_id, after)

    @api.route(
        app,
        "POST",
        "/api/live-sessions/{id}/observe",
        summary="Capture the desktop's state",
        tags=TAGS,
        responses={200: Observed, 409: ErrorMessage, **PLAIN},
    )
    @wired
    async def observe_live_session(id: str) -> Response:
        actor = await edge.authenticate()
        reply: r.ObserveReply = await ask(
            state, r.ObserveLive(actor=actor, session_id=_id(id, "Live session")), 60.0
        )
        return json_response(
            Observed(
                session=reply.session,
                heartbeat=reply.heartbeat,
                windows=reply.windows,
                screenshot=reply.screenshot,
            )
        )

    @api.route(
        app,
        "POST",
        "/api/live-sessions/{id}/commands",
        summary="Submit one instruction",
        tags=TAGS,
        request=r.CommandBody,
        responses={202: r.LiveSession, 400: AnyOf(ErrorMessage, Error), 409: ErrorMessage, **PLAIN},
    )
    @wired
    async def live_session_command(id: str) -> Response:
        actor = await edge.authenticate()
        session_id = _id(id, "Live session")
        body = await parse_body(r.CommandBody)
        reply: r.LiveReply = await ask(state, r.LiveCommand(actor=actor, session_id=session_id, body=body))
        return json_response(reply.session, 202)

    @api.route(
        app,
        "POST",
        "/api/live-sessions/{id}/confirm",
        summary="Resolve the pending confirmation",
        tags=TAGS,
        request=r.ConfirmBody,
        responses={200: r.LiveSession, 400: AnyOf(ErrorMessage, Error), **PLAIN},
    )
    @wired
    async def confirm_live_session(id: str) -> Response:
        actor = await edge.authenticate()
        session_id = _id(id, "Live session")
        body = await parse_body(r.ConfirmBody)
        reply: r.LiveReply = await ask(state, r.ConfirmLive(actor=actor, session_id=session_id, body=body))
        return json_response(reply.session)

    @api.route(
        app,
        "POST",
        "/api/live-sessions/{id}/stop",
        summary="Stop the current instruction",
        tags=TAGS,
        responses={200: r.LiveSession, **PLAIN},
    )
    @wired
    async def stop_live_session(id: str) -> Response:
        actor = await edge.authenticate()
        reply: r.LiveReply = await ask(state, r.StopLive(actor=actor, session_id=_id(id, "Live session")))
        return json_response(reply.session)

    @api.route(
        app,
        "GET",
        "/api/live-sessions/{id}/screen-stream",
        summary="SSE: JPEG frames about 2 per second",
        tags=TAGS,
        responses={200: None, **PLAIN},
    )
    @wired
    async def live_screen_stream(id: str) -> Response:
        actor = await edge.authenticate()
        session_id = _id(id, "Live session")
        await ask(state, r.GetLive(actor=actor, session_id=session_id))
        return screens.open(actor, session_id)

    # -- memory ------------------------------------------------------------------------------------

    @api.route(
        app,
        "GET",
        "/api/memory/global",
        summary="Global memory entries",
        tags=TAGS,
        responses={200: list[r.MemoryEntry]},
    )
    @wired
    async def global_memory() -> Response:
        actor = await edge.authenticate()
        reply: r.MemoryList = await ask(state, r.ListMemory(actor=actor, scope="global"))
        return json_response(reply.entries)

    @api.route(
        app, "GET", "/api/memory/apps", summary="App profiles", tags=TAGS, responses={200: list[r.AppProfile]}
    )
    @wired
    async def memory_apps() -> Response:
        actor = await edge.authenticate()
        reply: r.AppProfiles = await ask(state, r.ListApps(actor=actor))
        return json_response(reply.apps)

    @api.route(
        app,
        "GET",
        "/api/memory/apps/{name}",
        summary="One app profile",
        tags=TAGS,
        responses={200: r.AppProfile, **PLAIN},
    )
    @wired
    async def memory_app(name: str) -> Response:
        actor = await edge.authenticate()
        if not name or len(name) > 128 or not name.isprintable():
            raise WireError(404, {"error": "App profile not found."})
        reply: r.MemoryList = await ask(state, r.ListMemory(actor=actor, scope="app", app=name))
        return json_response(r.AppProfile(name=name, entries=reply.entries))

    @api.route(
        app,
        "POST",
        "/api/memory",
        summary="Create a memory entry",
        tags=TAGS,
        request=r.CreateMemoryBody,
        responses={201: r.MemoryEntry, 400: AnyOf(ErrorMessage, Error)},
    )
    @wired
    async def create_memory() -> Response:
        actor = await edge.authenticate()
        body = await parse_body(r.CreateMemoryBody)
        reply: r.MemoryReply = await ask(state, r.CreateMemory(actor=actor, body=body))
        return json_response(reply.entry, 201)

    @api.route(
        app,
        "DELETE",
        "/api/memory/{id}",
        summary="Delete a memory entry",
        tags=TAGS,
        responses={200: Deleted, **PLAIN},
    )
    @wired
    async def delete_memory(id: str) -> Response:
        actor = await edge.authenticate()
        await ask(state, r.DeleteMemory(actor=actor, entry_id=_id(id, "Memory entry")))
        return json_response(Deleted(deleted=True))

    # -- history -----------------------------------------------------------------------------------

    @api.route(
        app,
        "GET",
        "/api/history",
        summary="Runs and live sessions, newest first",
        tags=TAGS,
        query=HistoryQuery,
        responses={200: HistoryPage},
    )
    @wired
    async def list_history() -> Response:
        actor = await edge.authenticate()
        query = parse_query(HistoryQuery)
        if not 1 <= query.limit <= 100 or query.offset < 0:
            raise ApiError(400, "invalid_request", "limit is 1 to 100 and offset at least 0")
        reply: r.HistoryPage = await ask(
            state, r.ListHistory(actor=actor, limit=query.limit, offset=query.offset)
        )
        return json_response(
            HistoryPage(items=reply.items, total=reply.total, limit=reply.limit, offset=reply.offset)
        )

    @api.route(
        app,
        "GET",
        "/api/history/{id}",
        summary="One run or live session",
        tags=TAGS,
        responses={200: HistoryRecord, **PLAIN},
    )
    @wired
    async def get_history(id: str) -> Response:
        actor = await edge.authenticate()
        reply: r.HistoryRecord = await ask(state, r.GetHistory(actor=actor, item_id=_id(id, "History item")))
        return json_response(HistoryRecord(type=reply.kind, record=reply.record, events=reply.events))

    @api.route(
        app,
        "DELETE",
        "/api/history/{id}",
        summary="Delete a run or live session",
        tags=TAGS,
        responses={200: Deleted, 409: ErrorMessage, **PLAIN},
    )
    @wired
    async def delete_history(id: str) -> Response:
        actor = await edge.authenticate()
        await ask(state, r.DeleteHistory(actor=actor, item_id=_id(id, "History item")))
        return json_response(Deleted(deleted=True))
