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

from typing import Any
from urllib.parse import urlsplit

import trio
from quart import Response, request, websocket

from dovecote.bus import BusError
from dovecote.bus.messages import browsers as b
from dovecote.bus.messages.common import Principal
from dovecote.gateway.calls import call, json_response, parse_body, parse_query
from dovecote.gateway.edge import API_KEY_HEADER
from dovecote.gateway.errors import ApiError, Error, api_error
from dovecote.gateway.openapi import Operation
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
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise ApiError(404, "session_not_found", "no such browser session")
    return value


def _ws_base(scheme: str, host: str) -> str:
    return ("wss" if scheme in ("https", "wss") else "ws") + "://" + host


def connect_url(scheme: str, host: str, session_id: str, token: str, target: str | None = None) -> str:
    path = f"{PREFIX}/{session_id}/cdp" + (f"/page/{target}" if target else "")
    return f"{_ws_base(scheme, host)}{path}?token={token}"


def register(state: GatewayState) -> None:
    """Add the browser session routes and the DevTools WebSocket."""
    api, app, edge, bus = state.api, state.app, state.edge, state.bus

    def origin() -> tuple[str, str]:
        """Scheme and host clients reach the gateway at (``DOVECOTE_PUBLIC_URL`` when set)."""
        public = urlsplit(state.config.public_url) if state.config.public_url else None
        if public is not None and public.netloc:
            return public.scheme or "https", public.netloc
        return request.scheme, request.host

    async def ask(message: Any, timeout_s: float = 30.0) -> Any:
        return await call(state, SERVICE, message, timeout_s=timeout_s)

    @api.route(app, "POST", PREFIX, summary="Create a browser session (answers at once, status creating)",
               tags=TAGS, request=b.CreateBody, responses={200: b.Created, 400: Error, 429: Error})
    async def create_browser_session() -> Response:
        actor = await edge.authenticate()
        body = await parse_body(b.CreateBody)
        reply: b.CreatedReply = await ask(b.CreateSession(actor=actor, body=body))
        return json_response(reply.created)

    @api.route(app, "GET", PREFIX, summary="List your team's browser sessions", tags=TAGS,
               query=b.ListQuery, responses={200: b.SessionPage, 400: Error})
    async def list_browser_sessions() -> Response:
        actor = await edge.authenticate()
        query = parse_query(b.ListQuery)
        reply: b.PageReply = await ask(b.ListSessions(actor=actor, query=query))
        return json_response(reply.page)

    @api.route(app, "GET", PREFIX + "/{id}", summary="A browser session (history, counts, connectUrl)",
               tags=TAGS, responses={200: b.SessionDetail, 404: Error})
    async def get_browser_session(id: str) -> Response:
        actor = await edge.authenticate()
        reply: b.DetailReply = await ask(b.GetSession(actor=actor, session_id=_session_id(id)))
        session = reply.session
        if reply.cdp_token:
            session.connectUrl = connect_url(*origin(), session.sessionId, reply.cdp_token)
        return json_response(session)

    @api.route(app, "DELETE", PREFIX + "/{id}", summary="Terminate a session (artifacts are kept)",
               tags=TAGS, responses={200: b.Terminated, 404: Error})
    async def delete_browser_session(id: str) -> Response:
        actor = await edge.authenticate()
        reply: b.TerminatedReply = await ask(b.DeleteSession(actor=actor, session_id=_session_id(id)), 60.0)
        return json_response(reply.result)

    @api.route(app, "GET", PREFIX + "/{id}/actions", summary="The session's action log", tags=TAGS,
               query=b.ActionsQuery, responses={200: b.ActionPage, 400: Error, 404: Error})
    async def browser_session_actions(id: str) -> Response:
        actor = await edge.authenticate()
        session_id = _session_id(id)
        query = parse_query(b.ActionsQuery)
        reply: b.ActionsReply = await ask(b.GetActions(actor=actor, session_id=session_id, query=query))
        return json_response(reply.page)

    @api.route(app, "GET", PREFIX + "/{id}/artifacts", summary="Screenshots and recordings, with signed URLs",
               tags=TAGS, responses={200: b.ArtifactList, 404: Error})
    async def browser_session_artifacts(id: str) -> Response:
        actor = await edge.authenticate()
        reply: b.ArtifactsReply = await ask(b.GetArtifacts(actor=actor, session_id=_session_id(id)))
        for artifact in reply.artifacts:
            if artifact.publicUrl.startswith("/"):
                scheme, host = origin()
                artifact.publicUrl = f"{scheme}://{host}{artifact.publicUrl}"
        return json_response(b.ArtifactList(artifacts=reply.artifacts))

    @api.route(app, "GET", PREFIX + "/{id}/health", summary="Session state and a real CDP round trip",
               tags=TAGS, responses={200: b.SessionHealth, 404: Error})
    async def browser_session_health(id: str) -> Response:
        actor = await edge.authenticate()
        reply: b.HealthReply = await ask(b.GetHealth(actor=actor, session_id=_session_id(id)))
        return json_response(reply.health)

    @api.route(app, "GET", PREFIX + "/{id}/console", summary="Console messages and exceptions of the pages",
               tags=TAGS, responses={200: b.ConsoleLog, 404: Error})
    async def browser_session_console(id: str) -> Response:
        actor = await edge.authenticate()
        reply: b.ConsoleReply = await ask(b.GetConsole(actor=actor, session_id=_session_id(id)))
        return json_response(b.ConsoleLog(logs=reply.logs))

    @api.route(app, "GET", PREFIX + "/{id}/network", summary="Requests of the pages", tags=TAGS,
               responses={200: b.NetworkLog, 404: Error})
    async def browser_session_network(id: str) -> Response:
        actor = await edge.authenticate()
        reply: b.NetworkReply = await ask(b.GetNetwork(actor=actor, session_id=_session_id(id)))
        return json_response(b.NetworkLog(requests=reply.requests))

    # -- DevTools ----------------------------------------------------------------------------

    async def cdp_auth(headers: Any, args: Any) -> tuple[Principal | None, str | None]:
        key = headers.get(API_KEY_HEADER)
        if key:
            return await edge.resolve_api_key(key), None
        token = args.get("token")
        if token and len(token) <= MAX_TOKEN:
            return None, token
        raise ApiError(401, "unauthorized", "an x-api-key header or a CDP token (?token=) is required")

    async def discovery(id: str) -> b.DiscoveryReply:
        actor, token = await cdp_auth(request.headers, request.args)
        reply: b.DiscoveryReply = await ask(b.GetDiscovery(actor=actor, token=token,
                                                           session_id=_session_id(id)))
        return reply

    async def json_version(id: str) -> Response:
        reply = await discovery(id)
        v = reply.version
        return json_response({
            "Browser": v.get("product", ""), "Protocol-Version": v.get("protocolVersion", "1.3"),
            "User-Agent": v.get("userAgent", ""), "V8-Version": v.get("jsVersion", ""),
            "WebKit-Version": v.get("revision", ""),
            "webSocketDebuggerUrl": connect_url(*origin(), id, reply.cdp_token)})

    async def json_list(id: str) -> Response:
        reply = await discovery(id)
        return json_response([{
            "description": "", "devtoolsFrontendUrl": "", "id": t["id"], "title": t["title"],
            "type": t["type"], "url": t["url"],
            "webSocketDebuggerUrl": connect_url(*origin(), id, reply.cdp_token, t["id"]),
        } for t in reply.targets])

    # Clients ask for these with and without a trailing slash (Playwright asks for
    # ``/json/version/``), and ``/json`` is Chrome's alias of ``/json/list``: each
    # served variant is documented.
    for suffix, view in (("/json/version", json_version), ("/json/list", json_list), ("/json", json_list)):
        path = PREFIX + "/{id}" + suffix
        for variant in (path, path + "/"):
            slash = "_slash" if variant.endswith("/") else ""
            name = suffix.strip("/").replace("/", "_")
            app.add_url_rule(variant.replace("{", "<").replace("}", ">"),
                             view.__name__ + slash + "_" + suffix, view, methods=["GET"])
            api.operations.append(Operation(
                method="get", path=variant, summary=f"DevTools discovery ({suffix}{'/' if slash else ''})",
                tags=TAGS, responses={200: None, 401: Error, 404: Error, 409: Error},
                operation_id=f"browser_{name}{slash}"))

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
        app.add_websocket(path.replace("{", "<").replace("}", ">"), view.__name__, view)
        api.operations.append(Operation(method="get", path=path, summary=summary, tags=TAGS,
                                        responses={101: None, 401: Error, 404: Error, 409: Error},
                                        operation_id=view.__name__))
