"""Desktop sessions an agent can drive: ``/api/sessions*``, ``/api/tasks*``, ``/api/dashboard``,
``/api/health``, ``/api/capabilities`` (the desktop sessions reference, tag ``desktops``).

Every route takes ``X-API-Key`` or the session cookie (with CSRF for changes)
and asks the ``desktops`` service. The reference's error bodies are kept
exactly: a refusal carrying ``details["wire"]`` (an unknown session is
``{"error": "session not found"}``, an unready bridge ``{"error":
StructuredError}``) is sent as that body; any other refusal, and a service
that does not answer, take the platform's one mapping
(:func:`~dovecote.gateway.errors.api_error`). Each operation documents the
error bodies it really sends: the platform's ``Error`` (``{"error": {"code",
"message"}}``, which is also the reference's shape for a bad create) by
default, and per status the reference's own (:class:`ErrorMessage`,
:class:`StructuredErrorBody`, :class:`LiveViewUnavailable`,
:class:`ReviewUnavailable`).

A qemu create while the desktop template is not built (or its build failed)
is 503 ``desktop_template_unavailable`` with ``Retry-After``: the request is
right and the host will serve it once the template is there (the reference
keeps 424 ``missing_tool`` for a host tool the operator must install);
``provider: "xvfb"`` works meanwhile where the operator enabled it.

An action body is decoded with the action union's decoder: an unknown kind, a
missing or mistyped field is 400 ``{"error": StructuredError}`` with code
``invalid_action``, before anything reaches the service.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from quart import Response, request

from dovecote.bus.messages import desktops as d
from dovecote.gateway.calls import decode_json, json_response, refuse_unstorable
from dovecote.gateway.errors import ApiError, Error, api_error
from dovecote.gateway.openapi import AnyOf
from dovecote.gateway.routes import live_view as live_view_routes
from dovecote.gateway.routes import recorder as recorder_routes
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import DovecoteError, ServiceError

SERVICE = "desktops"
MAX_ID = 64
CREATE_TIMEOUT_S = 120.0
ACTION_TIMEOUT_S = 200.0
TAGS = ["desktops"]


class SessionEnvelope(msgspec.Struct, kw_only=True):
    session: d.SessionRecord


class SessionDetail(msgspec.Struct, kw_only=True):
    session: d.SessionRecord
    browser_adapter: bool


class SessionsEnvelope(msgspec.Struct, kw_only=True):
    sessions: list[d.SessionRecord]


class Ok(msgspec.Struct, kw_only=True):
    ok: bool


class TaskEnvelope(msgspec.Struct, kw_only=True):
    task: d.Task


class Dashboard(msgspec.Struct, kw_only=True):
    tasks: list[d.Task]
    action_history: dict[str, list[d.HistoryEntry]]


class ErrorMessage(msgspec.Struct, kw_only=True):
    """The reference's plain error (an unknown session or task)."""

    error: str


class StructuredErrorBody(msgspec.Struct, kw_only=True):
    """The reference's structured error (an invalid action, an unready bridge)."""

    error: d.StructuredError


class LiveViewError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    session_id: str
    live_desktop_view: d.LiveDesktopView


class LiveViewUnavailable(msgspec.Struct, kw_only=True):
    """A session without a live desktop stream."""

    error: LiveViewError


class ReviewUnavailable(msgspec.Struct, kw_only=True):
    """A session that cannot export a review bundle: its review recording summary."""

    error: d.ReviewRecordingSummary


NOT_FOUND = {404: ErrorMessage}
ACTION_ERRORS = {400: AnyOf(StructuredErrorBody, Error), 404: ErrorMessage,
                 409: AnyOf(StructuredErrorBody, Error)}
BRIDGE_ERRORS = {404: ErrorMessage, 409: StructuredErrorBody}


class WireError(Exception):
    """A response whose body is the reference's own error shape."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def wired(view: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Answer a :class:`WireError` with its exact body."""

    @functools.wraps(view)
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        try:
            return await view(*args, **kwargs)
        except WireError as exc:
            return json_response(exc.body, exc.status)

    return wrapper


def _session_id(value: str) -> str:
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise WireError(404, {"error": "session not found"})
    return value


def _task_id(value: str) -> str:
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise WireError(404, {"error": "task not found"})
    return value


def _invalid_action(message: str) -> WireError:
    return WireError(400, {"error": d.StructuredError(code="invalid_action", message=message,
                                                      category="validation")})


async def _action_body() -> d.Action:
    content_type = request.mimetype or ""
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    raw = await request.get_data(cache=False)
    if not raw:
        raise _invalid_action("a JSON action object is required")
    try:
        refuse_unstorable(raw)
    except ApiError as exc:
        raise _invalid_action(exc.message) from None
    try:
        action: d.Action = d.action_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _invalid_action(f"{exc} (kinds: {', '.join(d.ACTION_KINDS)})") from None
    except msgspec.DecodeError:
        raise _invalid_action("the body is not valid JSON") from None
    return action


def _body(body_type: type[Any]) -> Callable[[], Awaitable[Any]]:
    async def parse() -> Any:
        raw = await request.get_data(cache=False)
        if not raw:
            raise ApiError(400, "invalid_request", "a JSON body is required")
        return decode_json(raw, body_type)

    return parse


async def ask(state: GatewayState, message: Any, timeout_s: float = 30.0) -> Any:
    """Send ``message`` to the desktops service; refusals become their HTTP answer."""
    try:
        return await state.bus.request(SERVICE, message, timeout=timeout_s)
    except ServiceError as exc:
        wire = (exc.details or {}).get("wire")
        if wire is not None:
            raise WireError(exc.status, wire) from None
        raise api_error(exc, SERVICE) from None
    except DovecoteError as exc:
        raise api_error(exc, SERVICE) from None


def register(state: GatewayState) -> None:
    """Add the desktop session, task, dashboard, health and capabilities routes."""
    api, app, edge = state.api, state.app, state.edge
    parse_create = _body(d.CreateSessionBody)
    parse_task = _body(d.CreateTaskBody)

    @api.route(app, "POST", "/api/sessions", summary="Create a desktop session", tags=TAGS,
               request=d.CreateSessionBody, responses={201: SessionEnvelope, 503: Error},
               descriptions={503: "desktop_template_unavailable: the qemu desktop template is not "
                                  "built on this host (yet), retry after Retry-After or use "
                                  "provider xvfb where enabled; provider_unavailable, "
                                  "service_unavailable: retry later"})
    @wired
    async def create_desktop_session() -> Response:
        actor = await edge.authenticate()
        body = await parse_create()
        reply: d.SessionReply = await ask(state, d.CreateSession(actor=actor, body=body),
                                          CREATE_TIMEOUT_S)
        return json_response(SessionEnvelope(session=reply.session), 201)

    @api.route(app, "GET", "/api/sessions", summary="List your team's desktop sessions", tags=TAGS,
               responses={200: SessionsEnvelope})
    @wired
    async def list_desktop_sessions() -> Response:
        actor = await edge.authenticate()
        reply: d.SessionList = await ask(state, d.ListSessions(actor=actor))
        return json_response(SessionsEnvelope(sessions=reply.sessions))

    @api.route(app, "GET", "/api/sessions/{id}", summary="Session metadata and browser adapter",
               tags=TAGS, responses={200: SessionDetail, **NOT_FOUND})
    @wired
    async def get_desktop_session(id: str) -> Response:
        actor = await edge.authenticate()
        reply: d.SessionReply = await ask(state, d.GetSession(actor=actor, session_id=_session_id(id)))
        return json_response(SessionDetail(session=reply.session, browser_adapter=reply.browser_adapter))

    @api.route(app, "DELETE", "/api/sessions/{id}", summary="Stop a session and delete its runtime storage",
               tags=TAGS, responses={200: Ok, **NOT_FOUND})
    @wired
    async def delete_desktop_session(id: str) -> Response:
        actor = await edge.authenticate()
        await ask(state, d.DeleteSession(actor=actor, session_id=_session_id(id)), 90.0)
        return json_response(Ok(ok=True))

    @api.route(app, "POST", "/api/sessions/{id}/actions", summary="Run one action (an ActionReceipt)",
               tags=TAGS, request=d.Action, responses={200: d.ActionReceipt, **ACTION_ERRORS})
    @wired
    async def run_desktop_action(id: str) -> Response:
        actor = await edge.authenticate()
        session_id = _session_id(id)
        action = await _action_body()
        reply: d.ReceiptReply = await ask(state, d.RunAction(actor=actor, session_id=session_id,
                                                             action=action), ACTION_TIMEOUT_S)
        return json_response(reply.receipt)

    @api.route(app, "GET", "/api/sessions/{id}/actions", summary="A session's capabilities",
               tags=TAGS, responses={200: d.Capabilities, **NOT_FOUND})
    @wired
    async def desktop_session_capabilities(id: str) -> Response:
        actor = await edge.authenticate()
        reply: d.CapabilitiesReply = await ask(state, d.GetCapabilities(actor=actor,
                                                                        session_id=_session_id(id)))
        return json_response(reply.capabilities)

    @api.route(app, "GET", "/api/sessions/{id}/observation", summary="The latest desktop observation",
               tags=TAGS, responses={200: d.Observation, **BRIDGE_ERRORS})
    @wired
    async def desktop_observation(id: str) -> Response:
        actor = await edge.authenticate()
        reply: d.ObservationReply = await ask(state, d.GetObservation(
            actor=actor, session_id=_session_id(id)), 60.0)
        return json_response(reply.observation)

    @api.route(app, "GET", "/api/sessions/{id}/screenshot", summary="The current display as image/png",
               tags=TAGS, responses={200: None, **BRIDGE_ERRORS})
    @wired
    async def desktop_screenshot(id: str) -> Response:
        actor = await edge.authenticate()
        reply: d.ScreenshotReply = await ask(state, d.GetScreenshot(
            actor=actor, session_id=_session_id(id)), 60.0)
        return Response(reply.png, status=200, content_type="image/png",
                        headers={"Cache-Control": "no-store"})

    @api.route(app, "GET", "/api/sessions/{id}/live-view/", summary="The live desktop stream",
               tags=TAGS, responses={200: None, 409: LiveViewUnavailable, **NOT_FOUND})
    @wired
    async def desktop_live_view(id: str) -> Response:
        if request.args.get("token") is not None:  # a viewer token: the live view's own check
            return await live_view_routes.session_page(state, _session_id(id))
        actor = await edge.authenticate()
        reply: d.SessionReply = await ask(state, d.GetSession(actor=actor, session_id=_session_id(id)))
        view = reply.session.live_desktop_view
        if view.mode == "stream":  # noVNC (gateway/routes/live_view.py)
            return await live_view_routes.session_page(state, reply.session.id)
        raise WireError(409, {"error": {
            "code": "live_desktop_view_unavailable",
            "message": "this session has no live desktop stream"
                       + (f"; poll {view.canonical_url}" if view.canonical_url else ""),
            "session_id": reply.session.id, "live_desktop_view": view}})

    @api.route(app, "POST", "/api/sessions/{id}/review/export", summary="Export the review bundle",
               tags=TAGS, responses={200: None, 409: ReviewUnavailable, **NOT_FOUND})
    @wired
    async def export_desktop_review(id: str) -> Response:
        actor = await edge.authenticate()
        reply: d.SessionReply = await ask(state, d.GetSession(actor=actor, session_id=_session_id(id)))
        if reply.session.review_recording.mode == "sparse_timeline":  # the recorder exports it
            return json_response(await recorder_routes.export_review(state, actor, reply.session.id))
        raise WireError(409, {"error": reply.session.review_recording})

    @api.route(app, "POST", "/api/tasks", summary="Create a task bound to a session", tags=TAGS,
               request=d.CreateTaskBody, responses={201: TaskEnvelope, **NOT_FOUND})
    @wired
    async def create_desktop_task() -> Response:
        actor = await edge.authenticate()
        body = await parse_task()
        reply: d.TaskReply = await ask(state, d.CreateTask(actor=actor, body=body))
        return json_response(TaskEnvelope(task=reply.task), 201)

    @api.route(app, "GET", "/api/tasks/{id}", summary="Task status and latest receipt", tags=TAGS,
               responses={200: TaskEnvelope, **NOT_FOUND})
    @wired
    async def get_desktop_task(id: str) -> Response:
        actor = await edge.authenticate()
        reply: d.TaskReply = await ask(state, d.GetTask(actor=actor, task_id=_task_id(id)))
        return json_response(TaskEnvelope(task=reply.task))

    for verb in d.TASK_VERBS:

        def bind(verb: str = verb) -> None:
            async def change_task(id: str) -> Response:
                actor = await edge.authenticate()
                reply: d.TaskReply = await ask(state, d.ChangeTask(
                    actor=actor, task_id=_task_id(id), verb=verb))  # type: ignore[arg-type]
                return json_response(TaskEnvelope(task=reply.task))

            change_task.__name__ = f"{verb}_desktop_task"
            api.route(app, "POST", f"/api/tasks/{{id}}/{verb}", summary=f"Task lifecycle: {verb}",
                      tags=TAGS, responses={200: TaskEnvelope, **NOT_FOUND})(wired(change_task))

        bind()

    @api.route(app, "GET", "/api/dashboard", summary="Tasks and per-session action history",
               tags=TAGS, responses={200: Dashboard})
    @wired
    async def desktop_dashboard() -> Response:
        actor = await edge.authenticate()
        reply: d.DashboardReply = await ask(state, d.GetDashboard(actor=actor))
        return json_response(Dashboard(tasks=reply.tasks, action_history=reply.action_history))

    @api.route(app, "GET", "/api/health", summary="Control-plane and guest-runtime health",
               tags=TAGS, responses={200: d.DesktopHealth})
    @wired
    async def desktop_health() -> Response:
        actor = await edge.authenticate()
        reply: d.HealthReply = await ask(state, d.GetHealth(actor=actor))
        return json_response(reply.health)

    @api.route(app, "GET", "/api/capabilities", summary="Runtime capabilities of the service",
               tags=TAGS, responses={200: d.Capabilities})
    @wired
    async def desktop_capabilities() -> Response:
        actor = await edge.authenticate()
        reply: d.CapabilitiesReply = await ask(state, d.GetCapabilities(actor=actor))
        return json_response(reply.capabilities)
