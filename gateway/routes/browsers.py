"""Browser sessions: ``/browser/api/sessions*`` (the browser sessions reference, tag ``browsers``).

The reference's base URL is ``/browser``: a client of that API pointed at
``http://<dovecote>/browser`` works unchanged, with its ``x-api-key`` header
(a Dovecote API key; the session cookie works too). Bodies and queries are
decoded into the Structs of :mod:`dovecote.bus.messages.browsers`, so a bad
viewport, an unknown browser or ``limit`` 0 or 101 is 400 in the platform's
``{"error": {"code", "message"}}`` before anything reaches the service; an
unknown session, or another team's, is 404 ``session_not_found``.

DevTools, for automation libraries (Playwright's ``connect_over_cdp``,
Puppeteer's ``connect``):

* ``GET /browser/api/sessions/{id}/cdp``: the browser's DevTools WebSocket
  (the session body's ``connectUrl``), and ``.../cdp/page/{target}`` one
  page's; each is one bus stream to the ``browsers`` service
  (:class:`~dovecote.bus.messages.browsers.OpenCdp`), one CDP message per
  frame, with the bus's credit flow control end to end;
* ``GET /browser/api/sessions/{id}/json/version`` and ``.../json/list``: the
  discovery documents, their ``webSocketDebuggerUrl`` s pointing back here.

These authenticate with ``x-api-key`` or with ``?token=``: a short-lived token
bound to the session, minted by the service and carried in ``connectUrl``
(WebSocket clients often cannot set headers). Refusals before the upgrade are
HTTP answers (401, 404, 409).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import trio
from quart import Response, current_app, request, websocket

from dovecote.bus import BusError
from dovecote.bus.messages import browsers as b
from dovecote.bus.messages.common import Principal
from dovecote.gateway.calls import call, json_response
from dovecote.gateway.edge import API_KEY_HEADER
from dovecote.gateway.errors import ApiError, Error, api_error
from dovecote.gateway.routing import Call, Family, Route, path_id, register_routes
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import DovecoteError, ServiceError
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.gateway.browsers")

SERVICE = "browsers"
PREFIX = "/browser/api/sessions"
TAGS = ["browsers"]
MAX_ID = 64
MAX_TOKEN = 200
STREAM_WINDOW = 32


def _session_id(value: str) -> str:
    return path_id(value, ApiError(404, "session_not_found", "no such browser session"))


def _ws_base(scheme: str, host: str) -> str:
    return ("wss" if scheme in ("https", "wss") else "ws") + "://" + host


def connect_url(scheme: str, host: str, session_id: str, token: str, target: str | None = None) -> str:
    path = f"{PREFIX}/{session_id}/cdp" + (f"/page/{target}" if target else "")
    return f"{_ws_base(scheme, host)}{path}?token={token}"


def origin(state: GatewayState) -> tuple[str, str]:
    """Scheme and host clients reach the gateway at (``DOVECOTE_PUBLIC_URL`` when set)."""
    public = urlsplit(state.config.public_url) if state.config.public_url else None
    if public is not None and public.netloc:
        return public.scheme or "https", public.netloc
    return request.scheme, request.host


def _session(ctx: Call) -> str:
    return _session_id(ctx.params["id"])


def _detail(ctx: Call, reply: b.DetailReply) -> b.SessionDetail:
    session = reply.session
    if reply.cdp_token:
        session.connectUrl = connect_url(*origin(ctx.state), session.sessionId, reply.cdp_token)
    return session


def _artifacts(ctx: Call, reply: b.ArtifactsReply) -> b.ArtifactList:
    for artifact in reply.artifacts:
        if artifact.publicUrl.startswith("/"):
            scheme, host = origin(ctx.state)
            artifact.publicUrl = f"{scheme}://{host}{artifact.publicUrl}"
    return b.ArtifactList(artifacts=reply.artifacts)


def _with_call(build: Callable[[Call, Any], Any],
               message: Callable[[Call], Any]) -> Callable[[Call], Awaitable[Any]]:
    """A ``handle``: send ``message(ctx)`` and answer ``build(ctx, reply)``."""
    async def handle(ctx: Call) -> Any:
        return build(ctx, await call(ctx.state, SERVICE, message(ctx), timeout_s=30.0))
    return handle


async def cdp_auth(headers: Any, args: Any) -> tuple[Principal | None, str | None]:
    """``x-api-key`` (its principal) or ``?token=`` (the session's CDP token), or 401."""
    key = headers.get(API_KEY_HEADER)
    if key:
        edge = current_app.extensions["dovecote"].edge
        return await edge.resolve_api_key(key), None
    token = args.get("token")
    if token and len(token) <= MAX_TOKEN:
        return None, token
    raise ApiError(401, "unauthorized", "an x-api-key header or a CDP token (?token=) is required")


def _json_version(ctx: Call, reply: b.DiscoveryReply) -> dict[str, Any]:
    v = reply.version
    return {
        "Browser": v.get("product", ""), "Protocol-Version": v.get("protocolVersion", "1.3"),
        "User-Agent": v.get("userAgent", ""), "V8-Version": v.get("jsVersion", ""),
        "WebKit-Version": v.get("revision", ""),
        "webSocketDebuggerUrl": connect_url(*origin(ctx.state), ctx.params["id"], reply.cdp_token)}


def _json_list(ctx: Call, reply: b.DiscoveryReply) -> list[dict[str, Any]]:
    return [{
        "description": "", "devtoolsFrontendUrl": "", "id": t["id"], "title": t["title"],
        "type": t["type"], "url": t["url"],
        "webSocketDebuggerUrl": connect_url(*origin(ctx.state), ctx.params["id"], reply.cdp_token, t["id"]),
    } for t in reply.targets]


def _discovery(ctx: Call) -> b.GetDiscovery:
    actor, token = ctx.actor
    return b.GetDiscovery(actor=actor, token=token, session_id=_session(ctx))


BROWSERS = Family(tags=TAGS, service=SERVICE, timeout_s=30.0)
DISCOVERY = Family(tags=TAGS, service=SERVICE, timeout_s=30.0, security=True,
                   auth=lambda: cdp_auth(request.headers, request.args))
"""The DevTools discovery documents: ``x-api-key`` or the session's ``?token=``."""

ROUTES = [
    Route(method="POST", path=PREFIX, name="create_browser_session",
          summary="Create a browser session (answers at once, status creating)", request=b.CreateBody,
          response=b.Created, responses={400: Error, 429: Error},
          message=lambda ctx: b.CreateSession(actor=ctx.actor, body=ctx.body),
          reply=lambda reply: reply.created),
    Route(method="GET", path=PREFIX, name="list_browser_sessions",
          summary="List your team's browser sessions", query=b.ListQuery, response=b.SessionPage,
          responses={400: Error},
          message=lambda ctx: b.ListSessions(actor=ctx.actor, query=ctx.query),
          reply=lambda reply: reply.page),
    Route(method="GET", path=PREFIX + "/{id}", name="get_browser_session",
          summary="A browser session (history, counts, connectUrl)", response=b.SessionDetail,
          responses={404: Error},
          handle=_with_call(_detail, lambda ctx: b.GetSession(actor=ctx.actor, session_id=_session(ctx)))),
    Route(method="DELETE", path=PREFIX + "/{id}", name="delete_browser_session",
          summary="Terminate a session (artifacts are kept)", response=b.Terminated,
          responses={404: Error}, timeout_s=60.0,
          message=lambda ctx: b.DeleteSession(actor=ctx.actor, session_id=_session(ctx)),
          reply=lambda reply: reply.result),
    Route(method="GET", path=PREFIX + "/{id}/actions", name="browser_session_actions",
          summary="The session's action log", ids={"id": _session_id}, query=b.ActionsQuery,
          response=b.ActionPage, responses={400: Error, 404: Error},
          message=lambda ctx: b.GetActions(actor=ctx.actor, session_id=ctx.params["id"], query=ctx.query),
          reply=lambda reply: reply.page),
    Route(method="GET", path=PREFIX + "/{id}/artifacts", name="browser_session_artifacts",
          summary="Screenshots and recordings, with signed URLs", response=b.ArtifactList,
          responses={404: Error},
          handle=_with_call(_artifacts,
                            lambda ctx: b.GetArtifacts(actor=ctx.actor, session_id=_session(ctx)))),
    Route(method="GET", path=PREFIX + "/{id}/health", name="browser_session_health",
          summary="Session state and a real CDP round trip", response=b.SessionHealth,
          responses={404: Error},
          message=lambda ctx: b.GetHealth(actor=ctx.actor, session_id=_session(ctx)),
          reply=lambda reply: reply.health),
    Route(method="GET", path=PREFIX + "/{id}/console", name="browser_session_console",
          summary="Console messages and exceptions of the pages", response=b.ConsoleLog,
          responses={404: Error},
          message=lambda ctx: b.GetConsole(actor=ctx.actor, session_id=_session(ctx)),
          reply=lambda reply: b.ConsoleLog(logs=reply.logs)),
    Route(method="GET", path=PREFIX + "/{id}/network", name="browser_session_network",
          summary="Requests of the pages", response=b.NetworkLog, responses={404: Error},
          message=lambda ctx: b.GetNetwork(actor=ctx.actor, session_id=_session(ctx)),
          reply=lambda reply: b.NetworkLog(requests=reply.requests)),
]

# Clients ask for these with and without a trailing slash (Playwright asks for
# ``/json/version/``), and ``/json`` is Chrome's alias of ``/json/list``: each
# served variant is documented.
DISCOVERY_ROUTES = [
    Route(method="GET", path=PREFIX + "/{id}" + suffix + slash,
          name=f"browser_{suffix.strip('/').replace('/', '_')}{'_slash' if slash else ''}",
          summary=f"DevTools discovery ({suffix}{slash})",
          responses={401: Error, 404: Error, 409: Error},
          handle=_with_call(build, _discovery))
    for suffix, build in (("/json/version", _json_version), ("/json/list", _json_list),
                          ("/json", _json_list))
    for slash in ("", "/")
]


def register(state: GatewayState) -> None:
    """Add the browser session routes and the DevTools WebSocket."""
    api, app, bus = state.api, state.app, state.bus
    register_routes(state, BROWSERS, ROUTES)
    register_routes(state, DISCOVERY, DISCOVERY_ROUTES)

    async def cdp_socket(id: str, target: str | None = None) -> Response | None:
        try:
            actor, token = await cdp_auth(websocket.headers, websocket.args)
            session_id = _session_id(id)
        except ApiError as exc:
            return json_response({"error": {"code": exc.code, "message": exc.message}}, exc.status)
        start = b.OpenCdp(session_id=session_id, actor=actor, token=token, target_id=target)
        try:
            async with bus.open_stream(SERVICE, start, timeout=10.0, window=STREAM_WINDOW) as stream:
                try:
                    ready = await stream.receive()
                except ServiceError as exc:
                    return json_response({"error": {"code": exc.code, "message": exc.message}}, exc.status)
                except trio.EndOfChannel:
                    return json_response({"error": {"code": "session_not_running",
                                                    "message": "the session ended"}}, 409)
                if not isinstance(ready, b.CdpReady):
                    return json_response({"error": {"code": "protocol", "message": "unexpected frame"}}, 502)
                await websocket.accept()
                async with trio.open_nursery() as nursery:

                    async def client_to_browser() -> None:
                        while True:
                            data = await websocket.receive()
                            await stream.send(data.encode() if isinstance(data, str) else data)

                    nursery.start_soon(client_to_browser)
                    try:
                        async for message in stream:
                            if isinstance(message, bytes):
                                await websocket.send(message.decode())
                    except ServiceError as exc:
                        log.info("CDP stream refused", extra={"session_id": session_id, "error": exc.message})
                    nursery.cancel_scope.cancel()
        except (BusError, DovecoteError) as exc:
            error = api_error(exc, SERVICE)
            log.warning("CDP stream failed", extra={"session_id": id, "error": str(exc)})
            return json_response({"error": {"code": error.code, "message": error.message}}, error.status)
        await websocket.close(1000)
        return None

    async def browser_cdp(id: str) -> Response | None:
        return await cdp_socket(id)

    async def browser_page_cdp(id: str, target: str) -> Response | None:
        if not target or len(target) > 128 or not target.isalnum():
            return json_response({"error": {"code": "target_not_found", "message": "no such page"}}, 404)
        return await cdp_socket(id, target)

    sockets: list[tuple[str, Any, str]] = [
            (PREFIX + "/{id}/cdp", browser_cdp, "The browser's DevTools WebSocket (connectUrl)"),
            (PREFIX + "/{id}/cdp/page/{target}", browser_page_cdp, "One page's DevTools WebSocket")]
    for path, view, summary in sockets:
        api.stream(app, "GET", path, view, websocket=True, summary=summary, tags=TAGS,
                   responses={101: None, 401: Error, 404: Error, 409: Error})
