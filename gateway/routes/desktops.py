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
from typing import Any, get_args

import msgspec
from quart import Response, request

from dovecote.bus.messages import desktops as d
from dovecote.gateway.calls import decode_json, json_response, refuse_unstorable
from dovecote.gateway.errors import ApiError, Error, api_error
from dovecote.gateway.openapi import AnyOf
from dovecote.gateway.routes import live_view as live_view_routes
from dovecote.gateway.routes import recorder as recorder_routes
from dovecote.gateway.routing import Call, Family, Route, path_id, register_routes
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
    return path_id(value, WireError(404, {"error": "session not found"}))


def _task_id(value: str) -> str:
    return path_id(value, WireError(404, {"error": "task not found"}))


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


async def _json_body(body_type: Any) -> Any:
    """A JSON body (any content type, as the reference takes it), or 400."""
    raw = await request.get_data(cache=False)
    if not raw:
        raise ApiError(400, "invalid_request", "a JSON body is required")
    return decode_json(raw, body_type)


async def _action(body_type: Any) -> d.Action:
    return await _action_body()


async def ask_wired(state: GatewayState, service: str, message: Any, timeout_s: float = 30.0) -> Any:
    """Send ``message`` to ``service``; a refusal with ``details["wire"]`` is that body
    (:class:`WireError`), any other the platform's one mapping."""
    try:
        return await state.bus.request(service, message, timeout=timeout_s)
    except ServiceError as exc:
        wire = (exc.details or {}).get("wire")
        if wire is not None:
            raise WireError(exc.status, wire) from None
        raise api_error(exc, service) from None
    except DovecoteError as exc:
        raise api_error(exc, service) from None


def wired_send(service: str) -> Callable[[Call, Any, float], Awaitable[Any]]:
    """A route family's ``send`` through :func:`ask_wired`."""

    async def send(ctx: Call, message: Any, timeout_s: float) -> Any:
        return await ask_wired(ctx.state, service, message, timeout_s)

    return send


async def ask(state: GatewayState, message: Any, timeout_s: float = 30.0) -> Any:
    """Send ``message`` to the desktops service; refusals become their HTTP answer."""
    return await ask_wired(state, SERVICE, message, timeout_s)


def _session(ctx: Call) -> str:
    return _session_id(ctx.params["id"])


def _task(ctx: Call) -> str:
    return _task_id(ctx.params["id"])


async def _export_review(ctx: Call) -> Any:
    reply: d.SessionReply = await ask(ctx.state, d.GetSession(actor=ctx.actor, session_id=_session(ctx)))
    if reply.session.review_recording.mode == "sparse_timeline":  # the recorder exports it
        return await recorder_routes.export_review(ctx.state, ctx.actor, reply.session.id)
    raise WireError(409, {"error": reply.session.review_recording})


def _change_task(verb: d.TaskVerb) -> Route:
    return Route(method="POST", path=f"/api/tasks/{{id}}/{verb}", name=f"{verb}_desktop_task",
                 summary=f"Task lifecycle: {verb}", response=TaskEnvelope, responses=NOT_FOUND,
                 message=lambda ctx: d.ChangeTask(actor=ctx.actor, task_id=_task(ctx), verb=verb),
                 reply=lambda reply: TaskEnvelope(task=reply.task))


DESKTOPS = Family(tags=TAGS, service=SERVICE, send=wired_send(SERVICE), parse=_json_body, wrap=wired,
                  timeout_s=30.0)
"""Every route: API key or session; the reference's error bodies sent as they are (:func:`ask`)."""

ROUTES = [
    Route(method="POST", path="/api/sessions", name="create_desktop_session",
          summary="Create a desktop session", request=d.CreateSessionBody, response=SessionEnvelope,
          status=201, responses={503: Error},
          descriptions={503: "desktop_template_unavailable: the qemu desktop template is not "
                             "built on this host (yet), retry after Retry-After or use "
                             "provider xvfb where enabled; provider_unavailable, "
                             "service_unavailable: retry later"},
          message=lambda ctx: d.CreateSession(actor=ctx.actor, body=ctx.body), timeout_s=CREATE_TIMEOUT_S,
          reply=lambda reply: SessionEnvelope(session=reply.session)),
    Route(method="GET", path="/api/sessions", name="list_desktop_sessions",
          summary="List your team's desktop sessions", response=SessionsEnvelope,
          message=lambda ctx: d.ListSessions(actor=ctx.actor),
          reply=lambda reply: SessionsEnvelope(sessions=reply.sessions)),
    Route(method="GET", path="/api/sessions/{id}", name="get_desktop_session",
          summary="Session metadata and browser adapter", response=SessionDetail, responses=NOT_FOUND,
          message=lambda ctx: d.GetSession(actor=ctx.actor, session_id=_session(ctx)),
          reply=lambda reply: SessionDetail(session=reply.session, browser_adapter=reply.browser_adapter)),
    Route(method="DELETE", path="/api/sessions/{id}", name="delete_desktop_session",
          summary="Stop a session and delete its runtime storage", response=Ok, responses=NOT_FOUND,
          message=lambda ctx: d.DeleteSession(actor=ctx.actor, session_id=_session(ctx)), timeout_s=90.0,
          reply=lambda reply: Ok(ok=True)),
    Route(method="POST", path="/api/sessions/{id}/actions", name="run_desktop_action",
          summary="Run one action (an ActionReceipt)", ids={"id": _session_id}, request=d.Action,
          parse=_action, response=d.ActionReceipt, responses=ACTION_ERRORS, timeout_s=ACTION_TIMEOUT_S,
          message=lambda ctx: d.RunAction(actor=ctx.actor, session_id=ctx.params["id"], action=ctx.body),
          reply=lambda reply: reply.receipt),
    Route(method="GET", path="/api/sessions/{id}/actions", name="desktop_session_capabilities",
          summary="A session's capabilities", response=d.Capabilities, responses=NOT_FOUND,
          message=lambda ctx: d.GetCapabilities(actor=ctx.actor, session_id=_session(ctx)),
          reply=lambda reply: reply.capabilities),
    Route(method="GET", path="/api/sessions/{id}/observation", name="desktop_observation",
          summary="The latest desktop observation", response=d.Observation, responses=BRIDGE_ERRORS,
          message=lambda ctx: d.GetObservation(actor=ctx.actor, session_id=_session(ctx)), timeout_s=60.0,
          reply=lambda reply: reply.observation),
    Route(method="GET", path="/api/sessions/{id}/screenshot", name="desktop_screenshot",
          summary="The current display as image/png", responses=BRIDGE_ERRORS, timeout_s=60.0,
          message=lambda ctx: d.GetScreenshot(actor=ctx.actor, session_id=_session(ctx)),
          reply=lambda reply: Response(reply.png, status=200, content_type="image/png",
                                       headers={"Cache-Control": "no-store"})),
    # /api/sessions/{id}/live-view/: the live view's page, hand-written in register()
    Route(method="POST", path="/api/sessions/{id}/review/export", name="export_desktop_review",
          summary="Export the review bundle", responses={409: ReviewUnavailable, **NOT_FOUND},
          handle=_export_review),
    Route(method="POST", path="/api/tasks", name="create_desktop_task",
          summary="Create a task bound to a session", request=d.CreateTaskBody, response=TaskEnvelope,
          status=201, responses=NOT_FOUND,
          message=lambda ctx: d.CreateTask(actor=ctx.actor, body=ctx.body),
          reply=lambda reply: TaskEnvelope(task=reply.task)),
    Route(method="GET", path="/api/tasks/{id}", name="get_desktop_task",
          summary="Task status and latest receipt", response=TaskEnvelope, responses=NOT_FOUND,
          message=lambda ctx: d.GetTask(actor=ctx.actor, task_id=_task(ctx)),
          reply=lambda reply: TaskEnvelope(task=reply.task)),
    *[_change_task(verb) for verb in get_args(d.TaskVerb)],
    Route(method="GET", path="/api/dashboard", name="desktop_dashboard",
          summary="Tasks and per-session action history", response=Dashboard,
          message=lambda ctx: d.GetDashboard(actor=ctx.actor),
          reply=lambda reply: Dashboard(tasks=reply.tasks, action_history=reply.action_history)),
    Route(method="GET", path="/api/health", name="desktop_health",
          summary="Control-plane and guest-runtime health", response=d.DesktopHealth,
          message=lambda ctx: d.GetHealth(actor=ctx.actor), reply=lambda reply: reply.health),
    Route(method="GET", path="/api/capabilities", name="desktop_capabilities",
          summary="Runtime capabilities of the service", response=d.Capabilities,
          message=lambda ctx: d.GetCapabilities(actor=ctx.actor), reply=lambda reply: reply.capabilities),
]


def register(state: GatewayState) -> None:
    """Add the desktop session, task, dashboard, health and capabilities routes."""
    api, app, edge = state.api, state.app, state.edge
    register_routes(state, DESKTOPS, ROUTES)

    @api.route(app, "GET", "/api/sessions/{id}/live-view/", summary="The live desktop stream",
               tags=TAGS, responses={200: None, 409: LiveViewUnavailable, **NOT_FOUND}, streams=True)
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
