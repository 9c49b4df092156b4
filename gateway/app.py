"""The gateway's Quart-Trio application.

:func:`create_app` builds the app around a connected bus: it installs the
error handlers that keep every failure in the documented JSON shape, then lets
each route module register its views (and their OpenAPI operations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from quart import Response, current_app, has_request_context, make_response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from dovecote.gateway.calls import refuse_nul
from dovecote.gateway.edge import Edge
from dovecote.gateway.errors import STATUS_CODES, api_error
from dovecote.gateway.fastpath import FastPath
from dovecote.gateway.openapi import ApiRegistry
from dovecote.gateway.routes import accounts, admin, capsule_streams, capsules, events, health
from dovecote.gateway.routes import agents as agent_routes
from dovecote.gateway.routes import browsers as browser_routes
from dovecote.gateway.routes import builds as build_routes
from dovecote.gateway.routes import channels as channel_routes
from dovecote.gateway.routes import codex_auth as codex_auth_routes
from dovecote.gateway.routes import desktops as desktop_routes
from dovecote.gateway.routes import host_events as host_event_routes
from dovecote.gateway.routes import hosts as host_routes
from dovecote.gateway.routes import live_view as live_view_routes
from dovecote.gateway.routes import logs as log_routes
from dovecote.gateway.routes import metrics as metrics_routes
from dovecote.gateway.routes import oauth as oauth_routes
from dovecote.gateway.routes import recorder as recorder_routes
from dovecote.gateway.routes import runs as run_routes
from dovecote.gateway.routes import snapshots as snapshot_routes
from dovecote.gateway.routes import teams as team_routes
from dovecote.gateway.routing import Family, Route, register_routes
from dovecote.gateway.state import GatewayConfig, GatewayState
from dovecote.libs.context import new_request_id, request_id
from dovecote.libs.errors import DovecoteError, ServiceError
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.gateway")
VERSION = "0.1.0"
SETTLE_BODY_S = 2.0
"""How long an early error answer waits for the rest of a small body before closing instead."""


def _json_error(status: int, code: str, message: str,
                headers: dict[str, str] | None = None) -> Response:
    import msgspec

    # A route family that speaks another system's error shape renders its own (ApiRegistry.error_shape).
    api = current_app.extensions["dovecote"].api if has_request_context() else None
    own = api.render_error(request.path, status, code, message) if api is not None else None
    if own is not None:
        own.headers.update(headers or {})
        return own
    body = msgspec.json.encode({"error": {"code": code, "message": message}})
    return Response(body, status=status, content_type="application/json", headers=headers)


async def _settle_body(response: Response) -> Response:
    """Keep the connection usable after an answer given before the body was read.

    hypercorn cannot start the next request on a keep-alive connection while
    the previous body is unread: drain a small body, close after a large one.
    Every response passes here (errors, Quart's automatic OPTIONS answer, a
    view that ignores a body): an answer sent while the body was still on
    its way left the connection stuck — the client's next request on it was
    never answered, and its socket never closed (CLOSE-WAIT).
    """
    complete = getattr(getattr(request, "body", None), "_complete", None)
    if complete is not None and complete.is_set():
        return response  # the whole body has arrived (read or not)
    try:
        length = int(request.headers.get("Content-Length", "0") or 0)
    except ValueError:
        length = -1
    if length == 0 and "chunked" not in request.headers.get("Transfer-Encoding", ""):
        return response
    if 0 < length <= 1024 * 1024:
        # Bounded: a client that promised more than it sends must not hold the
        # answer back (Quart's own body timeout is a minute); it gets the answer
        # at once and the connection is closed instead.
        with trio.move_on_after(SETTLE_BODY_S):
            try:
                await request.get_data(cache=False)
                return response
            except Exception:  # the body is already consumed or unreadable
                pass
    response.headers["Connection"] = "close"
    return response


def create_app(config: GatewayConfig, bus: Any) -> QuartTrio:
    """Build the gateway app on a connected bus client."""
    # Explicit paths: Flask's package lookup does not follow setup.py's
    # folder mapping (bus/ -> dovecote.bus) in editable installs.
    here = str(Path(__file__).resolve().parent)
    app = QuartTrio("dovecote.gateway", root_path=here, instance_path=here)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    api = ApiRegistry("Dovecote", VERSION, "The unified API of the Dovecote agent platform.")
    state = GatewayState(app=app, config=config, bus=bus, api=api)
    state.edge = Edge(state)
    app.extensions["dovecote"] = state

    @app.before_request
    async def _bind_request_id() -> None:
        # Each request runs in its own task (and context copy): set, no reset.
        rid = request.headers.get("X-Request-Id", "")[:64]
        ok = rid and rid.isprintable() and " " not in rid
        request_id.set(rid if ok else new_request_id())

    @app.before_request
    async def _refuse_nul() -> None:
        # No text with NUL reaches a service from the path or query (bodies: calls.decode_json).
        refuse_nul(request.path)
        for key, value in request.args.items(multi=True):
            refuse_nul(key + value)

    @app.after_request
    async def _echo_request_id(response: Response) -> Response:
        rid = request_id.get()
        if rid:
            response.headers["X-Request-Id"] = rid
        return await _settle_body(response)

    @app.errorhandler(DovecoteError)  # ApiError, and any refusal or bus error let through
    async def _api_error(exc: DovecoteError) -> Response:
        err = api_error(exc)
        if not isinstance(exc, ServiceError):  # a bus error no route expected
            log.warning("bus error reached the app", extra={"path": request.path,
                                                             "error": repr(exc)})
        return await _settle_body(_json_error(err.status, err.code, err.message, err.headers))

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        # A 405 names the methods the resource has (``Allow``, RFC 9110).
        allow = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
        response = _json_error(status, STATUS_CODES.get(status, "error"), exc.description or "",
                               allow or None)
        return await _settle_body(response)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.path})
        return await _settle_body(_json_error(500, "internal_error", "internal error"))

    register_routes(state, Family(tags=["meta"], auth="public"), [
        Route(method="GET", path="/openapi.json", name="openapi", summary="This OpenAPI document",
              handle=lambda ctx: make_response(api.document()))])

    health.register(state)
    accounts.register(state)
    oauth_routes.register(state)
    admin.register(state)
    team_routes.register(state)
    capsules.register(state)
    capsule_streams.register(state)
    snapshot_routes.register(state)
    build_routes.register(state)
    host_routes.register(state)
    metrics_routes.register(state)
    agent_routes.register(state)
    events.register(state)
    host_event_routes.register(state)
    channel_routes.register(state)
    desktop_routes.register(state)
    browser_routes.register(state)
    recorder_routes.register(state)
    live_view_routes.register(state)
    run_routes.register(state)
    log_routes.register(state)
    codex_auth_routes.register(state)
    # The hot agent routes (Route(fast=True)) skip Quart's per-request machinery (gateway/fastpath.py).
    app.asgi_app = FastPath(state, app.asgi_app, settle=_settle_body)  # type: ignore[method-assign,assignment]
    return app
