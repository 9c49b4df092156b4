"""The live desktop view: noVNC's page and assets, and its WebSocket bridged to a bus stream.

``/v1/capsules/{id}/live-view/`` shows any running capsule's display (QEMU's
VNC server, relayed by its vmmgr: :mod:`dovecote.vmmgr.vnc`); a desktop
session's ``/api/sessions/{id}/live-view/`` is the same machinery once the
desktops service says which capsule the session runs in
(:func:`serve_page`, :func:`bridge`, see docs/architecture.md).

- noVNC comes from Debian's ``novnc`` package (``/usr/share/novnc``,
  ``DOVECOTE_NOVNC_DIR``): ``vnc_lite.html`` and its ES modules, served as
  they are (static code, no session data, so without authentication).
- Viewing needs the API's authentication. A browser cannot send
  ``X-API-Key``, so the API hands out a short-lived *viewer token*
  (``POST .../live-view/token``, or a ``GET`` of the page with the key or the
  session cookie redirects to the tokened URL). The token is an HMAC over
  (target kind, target id, team, expiry) and says nothing about the key;
  the page's URL carries it to noVNC, which puts it in the WebSocket's URL.
  A missing, forged, expired or other-target token is 401 before any byte of
  the display is sent. The token only has to be valid when the WebSocket
  opens; an open view lives on until closed.
- The WebSocket (subprotocol ``binary``) carries raw RFB bytes; each viewer is
  one bus stream to the capsule's vmmgr and one VNC connection there. Sending
  to a viewer waits for that viewer alone: a slow browser holds back its own
  stream's credit window, nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import mimetypes
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import trio
from quart import Response, redirect, request, websocket

from dovecote.bus import BusError, RemoteError
from dovecote.bus.messages import capsules as c
from dovecote.bus.messages import desktops as d
from dovecote.bus.messages import recorder as r
from dovecote.bus.messages.common import Principal
from dovecote.gateway.calls import call
from dovecote.gateway.edge import API_KEY_HEADER, SESSION_COOKIE
from dovecote.gateway.errors import ApiError, Error
from dovecote.gateway.routing import Call, Family, Route, register_routes
from dovecote.gateway.state import GatewayState
from dovecote.libs.config import BaseConfig, load_config
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.gateway.live_view")

WINDOW = 16
"""Bus frames in flight per viewer (each at most 64 KiB of RFB)."""
START_TIMEOUT_S = 15.0
TAGS = ["capsules"]

Resolve = Callable[[Principal, str], Awaitable[tuple[str, str]]]
"""``(actor, target id) -> (vmmgr bus name, capsule id)``; raises ApiError."""


class LiveViewConfig(BaseConfig, kw_only=True):
    """Settings of the live view (``DOVECOTE_*``)."""

    novnc_dir: str = "/usr/share/novnc"
    """Where Debian's ``novnc`` package put noVNC."""
    live_view_token_s: int = 300
    """How long a viewer token opens the view."""
    live_view_secret: str = ""
    """The viewer tokens' HMAC key; default: a random key kept in ``<data_dir>/live-view.key``
    (every gateway sharing the data directory agrees; set it when they do not)."""


class ViewerToken(msgspec.Struct, kw_only=True):
    url: str
    """The page, token included: open it in a browser."""
    token: str
    expires_at: int
    websocket_path: str


# -- viewer tokens (no I/O) ----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_token(secret: bytes, kind: str, target: str, team_id: str, expires: int) -> str:
    """A viewer token for one target (``capsule`` or ``session`` and its id) of one team."""
    body = _b64(msgspec.json.encode({"k": kind, "t": target, "team": team_id, "exp": expires}))
    sig = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}"


def check_token(secret: bytes, token: str, kind: str, target: str,
                now: float | None = None) -> dict[str, Any]:
    """The token's claims if it is valid for ``kind``/``target`` and not expired, else 401."""
    body, _, sig = token.partition(".")
    expected = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    if not body or not hmac.compare_digest(sig, expected):
        raise ApiError(401, "unauthorized", "invalid viewer token")
    try:
        claims: dict[str, Any] = msgspec.json.decode(_unb64(body))
    except (msgspec.DecodeError, ValueError):
        raise ApiError(401, "unauthorized", "invalid viewer token") from None
    if claims.get("k") != kind or claims.get("t") != target:
        raise ApiError(401, "unauthorized", "this viewer token is for another view")
    if float(claims.get("exp", 0)) < (time.time() if now is None else now):
        raise ApiError(401, "token_expired", "the viewer token has expired; ask for a new one")
    return claims


def load_secret(config: LiveViewConfig, data_dir: str) -> bytes:
    if config.live_view_secret:
        return config.live_view_secret.encode()
    path = Path(data_dir) / "live-view.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            data = path.read_bytes()
            if len(data) == 32:
                return data
            time.sleep(0.01)
        raise RuntimeError(f"corrupt live view key {path}") from None
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


# -- the machinery, for any target ------------------------------------------------------------


async def _no_sessions(actor: Principal, target: str) -> tuple[str, str]:
    raise ApiError(409, "live_desktop_view_unavailable", "desktop sessions have no live view here")


class LiveViews:
    """Pages, assets, tokens and WebSocket bridges of live views (capsules and sessions)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.config = load_config(LiveViewConfig, os.environ)
        self._secret: bytes | None = None
        self.resolve_session: Resolve = _no_sessions
        self.novnc = Path(self.config.novnc_dir)

    @property
    def secret(self) -> bytes:
        """The tokens' key (read or made on first use)."""
        if self._secret is None:
            self._secret = load_secret(self.config, self.state.config.data_dir)
        return self._secret

    def _base(self, kind: str, target: str) -> str:
        return (f"/v1/capsules/{target}/live-view" if kind == "capsule"
                else f"/api/sessions/{target}/live-view")

    def token(self, kind: str, target: str, actor: Principal) -> ViewerToken:
        expires = int(time.time()) + self.config.live_view_token_s
        token = mint_token(self.secret, kind, target, actor.team_id, expires)
        base = self._base(kind, target)
        ws_path = f"{base.lstrip('/')}/websockify?token={token}"
        url = f"{base}/?token={token}&path={quote(ws_path, safe='')}&scale=true"
        return ViewerToken(url=url, token=token, expires_at=expires, websocket_path="/" + ws_path)

    async def page(self, kind: str, target: str, actor_of: Callable[[], Awaitable[Principal]],
                   resolve: Resolve) -> Response:
        """noVNC's page for a tokened URL; the key or cookie get redirected to one."""
        token = request.args.get("token")
        if token is None:
            actor = await actor_of()
            await resolve(actor, target)  # 404/409 now rather than in the browser
            return redirect(self.token(kind, target, actor).url, 302)  # type: ignore[return-value]
        check_token(self.secret, token, kind, target)
        if "path" not in request.args:
            return redirect(self.token_url_of(kind, target, token), 302)  # type: ignore[return-value]
        html = await trio.Path(self.novnc / "vnc_lite.html").read_bytes()
        return Response(html, content_type="text/html; charset=utf-8", headers={
            "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "SAMEORIGIN"})

    def token_url_of(self, kind: str, target: str, token: str) -> str:
        base = self._base(kind, target)
        ws_path = f"{base.lstrip('/')}/websockify?token={token}"
        return f"{base}/?token={token}&path={quote(ws_path, safe='')}&scale=true"

    async def asset(self, name: str) -> Response:
        root = self.novnc.resolve()
        path = (root / name).resolve()
        if not str(path).startswith(str(root) + os.sep) or not await trio.Path(path).is_file():
            raise ApiError(404, "not_found", "no such live view asset")
        data = await trio.Path(path).read_bytes()
        ctype = "text/javascript" if path.suffix == ".js" else (
            mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        return Response(data, content_type=ctype, headers={"Cache-Control": "public, max-age=3600"})

    async def ws_actor(self, kind: str, target: str) -> Principal | dict[str, Any]:
        """Who opens this WebSocket: a viewer token, or the API key / session cookie."""
        token = websocket.args.get("token")
        if token:
            return check_token(self.secret, token, kind, target)
        key = websocket.headers.get(API_KEY_HEADER)
        edge = self.state.edge
        if key:
            return await edge.resolve_api_key(key)
        sid = websocket.cookies.get(SESSION_COOKIE)
        if not sid:
            raise ApiError(401, "unauthorized", "authentication required (a viewer token)")
        principal: Principal = (await edge.resolve_session(sid)).principal
        return principal

    async def bridge(self, kind: str, target: str, resolve: Resolve) -> Response | None:
        """The WebSocket ⇄ bus stream relay of one viewer."""
        try:
            who = await self.ws_actor(kind, target)
            actor = who if isinstance(who, Principal) else Principal(
                auth_type="viewer_token", team_id=str(who["team"]))
            host, capsule_id = await resolve(actor, target)
        except ApiError as exc:
            return Response(msgspec.json.encode({"error": {"code": exc.code, "message": exc.message}}),
                            status=exc.status, content_type="application/json")
        start = r.StreamVnc(actor=actor, capsule_id=capsule_id)
        try:
            async with self.state.bus.open_stream(host, start, timeout=START_TIMEOUT_S,
                                                  window=WINDOW) as stream:
                first = await stream.receive()
                if not isinstance(first, r.VncStarted):
                    raise ApiError(502, "stream_failed", "the display relay did not start")
                # websockify's ``binary`` when the viewer asks for it (noVNC 1.3 asks for none)
                asked = websocket.requested_subprotocols or []
                await websocket.accept(subprotocol="binary" if "binary" in asked else None)
                async with trio.open_nursery() as nursery:

                    async def viewer_to_display() -> None:
                        while True:
                            data = await websocket.receive()
                            if isinstance(data, str):
                                data = data.encode()
                            await stream.send(bytes(data))

                    nursery.start_soon(viewer_to_display)
                    async for frame in stream:
                        if isinstance(frame, bytes):
                            await websocket.send(frame)
                    nursery.cancel_scope.cancel()
        except ServiceError as exc:
            status = exc.status if 400 <= exc.status < 600 else 502
            return Response(msgspec.json.encode({"error": {"code": exc.code, "message": exc.message}}),
                            status=status, content_type="application/json")
        except (BusError, RemoteError) as exc:
            log.warning("live view stream failed", extra={"target": target, "error": str(exc)})
            return Response(msgspec.json.encode({"error": {
                "code": "service_unavailable", "message": "the capsule's host is unavailable"}}),
                status=503, content_type="application/json")
        return None

    async def status(self, host: str, actor: Principal, capsule_id: str) -> r.VncStatus:
        """The display's status from a real probe (``ready | degraded | stale | unavailable``)."""
        try:
            return await call(self.state, host, r.ProbeVnc(actor=actor, capsule_id=capsule_id),
                              timeout_s=15.0)
        except ApiError as exc:
            return r.VncStatus(status="unavailable", reason=exc.message)


def register(state: GatewayState) -> LiveViews:
    """Add the capsule live view routes (and document them); returns the machinery for sessions."""
    api, app, edge = state.api, state.app, state.edge
    views = LiveViews(state)

    async def resolve_capsule(actor: Principal, capsule_id: str) -> tuple[str, str]:
        if len(capsule_id) > 64 or not capsule_id.replace("-", "").isalnum():
            raise ApiError(404, "not_found", "capsule not found")
        # a viewer token's principal is its team: the capsule must be that team's
        reply: c.CapsuleReply = await call(state, "vmmgr", c.LookupCapsule(
            actor=actor, capsule_id=capsule_id, operation=True))
        if reply.capsule.status != "running":
            raise ApiError(409, "live_desktop_view_unavailable",
                           f"capsule {capsule_id} is {reply.capsule.status}, not running")
        return f"vmmgr.{reply.host_id}", capsule_id

    async def capsule_live_view_token(ctx: Call) -> Any:
        await resolve_capsule(ctx.actor, ctx.params["id"])
        return views.token("capsule", ctx.params["id"], ctx.actor)

    async def capsule_live_view_status(ctx: Call) -> Any:
        try:
            host, capsule_id = await resolve_capsule(ctx.actor, ctx.params["id"])
        except ApiError as exc:
            if exc.status != 409:
                raise
            return r.VncStatus(status="unavailable", reason=exc.message)
        return await views.status(host, ctx.actor, capsule_id)

    register_routes(state, Family(tags=TAGS), [
        Route(method="POST", path="/v1/capsules/{id}/live-view/token", name="capsule_live_view_token",
              summary="A viewer token for the live view", response=ViewerToken,
              responses={404: Error, 409: Error}, handle=capsule_live_view_token),
        Route(method="GET", path="/v1/capsules/{id}/live-view/status", name="capsule_live_view_status",
              summary="The live view's status (a probe)", response=r.VncStatus, responses={404: Error},
              handle=capsule_live_view_status),
    ])

    # -- the page, its assets and the RFB WebSocket: hand-written (a relay) --------------------

    @api.route(app, "GET", "/v1/capsules/{id}/live-view/", summary="The live view (noVNC)", tags=TAGS,
               responses={200: None, 302: None, 401: Error, 404: Error}, security=False, streams=True)
    async def capsule_live_view(id: str) -> Response:
        return await views.page("capsule", id, edge.authenticate, resolve_capsule)

    serve_relay(state, views, "capsule", "/v1/capsules/{id}/live-view", TAGS, resolve_capsule,
                "The live view's RFB WebSocket (subprotocol binary)")
    register_sessions(state, views, resolve_capsule)
    state.app.extensions["dovecote.live_views"] = views
    return views


def register_sessions(state: GatewayState, views: LiveViews, resolve_capsule: Resolve) -> None:
    """The desktop sessions' live view: token, assets and WebSocket (the page is
    ``/api/sessions/{id}/live-view/``, the desktops routes' own, which calls :func:`session_page`)."""
    tags = ["desktops"]

    async def resolve_session(actor: Principal, session_id: str) -> tuple[str, str]:
        if len(session_id) > 64:
            raise ApiError(404, "not_found", "session not found")
        reply: d.SessionReply = await call(state, "desktops",
                                           d.GetSession(actor=actor, session_id=session_id))
        view = reply.session.live_desktop_view
        if view.mode != "stream":
            raise ApiError(409, "live_desktop_view_unavailable",
                           view.reason or "this session has no live desktop stream")
        listed: c.CapsuleList = await call(state, "vmmgr", c.ListCapsules(actor=actor))
        for capsule in listed.capsules:
            if (capsule.metadata or {}).get("desktop_session") == session_id and capsule.status == "running":
                return await resolve_capsule(actor, capsule.id)
        raise ApiError(409, "live_desktop_view_unavailable", "the session's VM is not running")

    views.resolve_session = resolve_session

    async def session_live_view_token(ctx: Call) -> Any:
        await resolve_session(ctx.actor, ctx.params["id"])
        return views.token("session", ctx.params["id"], ctx.actor)

    register_routes(state, Family(tags=tags), [
        Route(method="POST", path="/api/sessions/{id}/live-view/token", name="session_live_view_token",
              summary="A viewer token for the live view", response=ViewerToken,
              responses={404: Error, 409: Error}, handle=session_live_view_token),
    ])

    serve_relay(state, views, "session", "/api/sessions/{id}/live-view", tags, resolve_session,
                "The live view's RFB WebSocket")


def serve_relay(state: GatewayState, views: LiveViews, kind: str, base: str, tags: list[str],
                resolve: Resolve, socket_summary: str) -> None:
    """noVNC's assets under ``base`` and the RFB WebSocket relay (hand-written: streams)."""

    async def asset(id: str, name: str) -> Response:
        return await views.asset(name)

    async def socket(id: str) -> Response | None:
        return await views.bridge(kind, id, resolve)

    state.api.stream(state.app, "GET", base + "/{name}", asset, rule=base.replace("{id}", "<id>")
                     + "/<path:name>", name=f"{kind}_live_view_asset",
                     summary="noVNC's assets (from the novnc package)", tags=tags,
                     responses={200: None, 404: Error}, security=False)
    state.api.stream(state.app, "GET", base + "/websockify", socket, websocket=True,
                     name=f"{kind}_live_view_socket", summary=socket_summary, tags=tags,
                     responses={101: None, 401: Error, 404: Error, 409: Error})


async def session_page(state: GatewayState, session_id: str) -> Response:
    """``GET /api/sessions/{id}/live-view/`` of a session with a stream (the desktops route calls it)."""
    views: LiveViews = state.app.extensions["dovecote.live_views"]
    return await views.page("session", session_id, state.edge.authenticate, views.resolve_session)
