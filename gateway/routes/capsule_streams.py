"""Streaming capsule routes: large files over HTTP, exec/process/PTY over WebSockets.

* ``POST /v1/capsules/{id}/files/stream/write`` (multipart/form-data ``path`` +
  ``file``, or ``?path=``) and ``POST .../files/stream/read`` (JSON ``path``,
  chunked ``application/octet-stream``);
* ``GET /v1/capsules/{id}/exec/stream``, ``.../processes/{selector}/stream``
  and ``.../pty``: WebSockets with the reference's JSON frames.

Each is one bus stream to ``vmmgr.<host_id>`` (see
:mod:`dovecote.bus.messages.capsule_streams` and :mod:`dovecote.vmmgr.streams`).
Nothing is buffered whole: the upload is parsed as it arrives (werkzeug's
sans-IO multipart decoder) and forwarded in frames of at most
:data:`FILE_FRAME` bytes with the bus's credit window, and the request body
itself is read with backpressure (:class:`BoundedHTTPConnection`: Quart's
ASGI reader otherwise buffers the body as fast as the client sends it).

Authentication is the REST routes': ``X-API-Key`` or the session cookie; the
WebSocket handshake is a GET (no CSRF token), so when a cookie is used its
``Origin`` must be the gateway's own (``Host``) or ``DOVECOTE_PUBLIC_URL``.
Refusals before the upgrade are HTTP answers (401/403/404/409); after it, an
``error`` frame and a close.

Frame translation (:class:`FrameCodec`) does no I/O and is tested alone.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import trio
from quart import Response, request, websocket
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

from dovecote.bus import BusError, BusTimeout, RemoteError
from dovecote.bus.messages import Message
from dovecote.bus.messages import capsule_streams as cs
from dovecote.bus.messages import capsules as c
from dovecote.bus.messages.common import Principal
from dovecote.gateway.calls import call, no_content, parse_body
from dovecote.gateway.edge import API_KEY_HEADER, SESSION_COOKIE
from dovecote.gateway.errors import ApiError, Error, api_error
from dovecote.gateway.routing import path_id
from dovecote.gateway.schemas import capsules as s
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.gateway.capsule_streams")

FILE_FRAME = 256 * 1024
"""Bytes per bus frame of a file (uploads are coalesced to this size)."""
WINDOW = 16
"""Bus frames in flight per stream: a transfer holds at most WINDOW x FILE_FRAME."""
BODY_HIGH_WATER = 1024 * 1024
"""Request bytes buffered before the ASGI reader stops reading the socket."""
MULTIPART_SLACK = 64 * 1024
"""Bytes of multipart framing (boundaries, the path field) allowed over the file limit."""
DRAIN_LIMIT = 64 * 1024 * 1024
"""After a 413 in mid-upload, read at most this much more so the client sees the answer."""
START_TIMEOUT_S = 30.0
DETACH_TIMEOUT_S = 3.0
"""How long a PTY's WebSocket end waits for the worker to apply the client's last frames."""
MAX_ID = 64


# -- a request body read with backpressure ------------------------------------------


class BoundedBody(TrioBody):
    """A body that, once iterated, makes the ASGI reader wait while it holds enough.

    Awaiting the whole body (``get_data``) works as before; only a consumer
    that iterates (a streaming route) engages the backpressure.
    """

    streaming = False

    def allow(self, max_bytes: int) -> None:
        """Lift the app-wide body limit for this request (the route enforces its own)."""
        self._max_content_length = None
        if isinstance(self._must_raise, Exception) and getattr(self._must_raise, "code", 0) == 413:
            self._must_raise = None
        self.route_limit = max_bytes

    def __aiter__(self) -> BoundedBody:
        self.streaming = True
        return self

    async def __anext__(self) -> bytes:
        data = await super().__anext__()
        drained = getattr(self, "_drained", None)
        if drained is not None:
            drained.set()
        return data

    async def wait_drained(self) -> None:
        """Wait until the consumer took what is buffered (only while it iterates)."""
        while self.streaming and len(self._data) >= BODY_HIGH_WATER and not self._complete.is_set():
            self._drained = trio.Event()
            await self._drained.wait()


class BoundedRequest(TrioRequest):
    body_class = BoundedBody


class BoundedHTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, reading the body only as fast as a streaming route consumes it."""

    async def handle_messages(self, nursery: trio.Nursery, request: Any, receive: Any) -> None:  # type: ignore[override]
        body = request.body
        while True:
            if isinstance(body, BoundedBody):
                await body.wait_drained()
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
            elif message["type"] == "http.disconnect":
                break
        nursery.cancel_scope.cancel()


# -- WebSocket frames (no I/O) -------------------------------------------------------------


class FrameError(Exception):
    """A client frame that cannot be understood (answered with a non-fatal ``error``)."""


Kind = Literal["exec", "process", "pty"]


class FrameCodec:
    """Translates between the reference's JSON frames and the bus stream's messages.

    ``kind`` is ``exec`` (``start``/``stdout``/``stderr``/``exit``/``error``
    text frames), ``process`` (the same, read-only) or ``pty`` (``started``,
    base64 ``output``, ``exit``, ``error`` with ``fatal``, ``ping``).
    """

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self._text = {ch: codecs.getincrementaldecoder("utf-8")("replace") for ch in ("stdout", "stderr")}

    # client → server

    @staticmethod
    def _decode(raw: str | bytes) -> dict[str, Any]:
        try:
            frame = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise FrameError("frames are JSON objects") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise FrameError('frames are JSON objects with a "type"')
        return frame

    def start(self, raw: str | bytes, op: dict[str, Any]) -> Message:
        """The bus start message of the client's first frame (``op``: actor, capsule_id, admin)."""
        frame = self._decode(raw)
        kind = frame["type"]
        try:
            if self.kind == "exec" and kind == "start":
                return cs.StreamExec(cmd=_text(frame.get("cmd"), "cmd", required=True),
                                     args=_strings(frame.get("args")), envs=_env(frame.get("envs")),
                                     cwd=_opt_text(frame.get("cwd")), user=_opt_text(frame.get("user")),
                                     **op)
            if self.kind == "pty" and kind == "start":
                return cs.StreamPty(cmd=_opt_text(frame.get("cmd")) or "/bin/bash",
                                    args=_strings(frame.get("args")),
                                    cols=_int(frame.get("cols", 80), "cols"),
                                    rows=_int(frame.get("rows", 24), "rows"),
                                    envs=_env(frame.get("envs")), cwd=_opt_text(frame.get("cwd")),
                                    user=_opt_text(frame.get("user")), **op)
            if self.kind == "pty" and kind == "connect":
                since = frame.get("since")
                return cs.StreamPty(connect=True, tag=_text(frame.get("tag"), "tag", required=True),
                                    since=None if since is None else _int(since, "since"), **op)
        except msgspec.ValidationError as exc:
            raise FrameError(str(exc)) from None
        expected = '"start" or "connect"' if self.kind == "pty" else '"start"'
        raise FrameError(f"the first frame must be {expected}")

    def control(self, raw: str | bytes) -> Message:
        """The bus control message of a later client frame."""
        frame = self._decode(raw)
        kind = frame["type"]
        if self.kind == "exec" and kind == "stop":
            return cs.ProcStop()
        if self.kind == "pty":
            if kind == "input":
                data = frame.get("data")
                if not isinstance(data, str):
                    raise FrameError("input needs base64 data")
                try:
                    return cs.PtyInput(data=base64.b64decode(data, validate=True))
                except (binascii.Error, ValueError):
                    raise FrameError("input data is not valid base64") from None
            if kind == "resize":
                return cs.PtyResize(cols=_int(frame.get("cols"), "cols"),
                                    rows=_int(frame.get("rows"), "rows"))
            if kind == "kill":
                return cs.PtyKill()
            if kind in ("ping", "pong"):
                raise FrameError("")  # keep-alives: nothing to do
        raise FrameError(f"unexpected frame type {kind!r}")

    # server → client

    def frames(self, message: Any) -> list[dict[str, Any]]:
        """The frames to send for one message of the worker (``[]`` for none)."""
        if isinstance(message, cs.ProcStarted):
            if self.kind == "pty":
                return [{"type": "started", "tag": message.tag, "pid": message.pid}]
            return [{"type": "start", "pid": message.pid}]
        if isinstance(message, cs.ProcOutput):
            if self.kind == "pty":
                return [{"type": "output", "data": base64.b64encode(message.data).decode()}]
            channel = "stderr" if message.channel == "stderr" else "stdout"
            text = self._text[channel].decode(message.data)
            return [{"type": channel, "data": text}] if text else []
        if isinstance(message, cs.ProcExit):
            out = [{"type": ch, "data": rest} for ch, dec in self._text.items()
                   if self.kind != "pty" and (rest := dec.decode(b"", final=True))]
            return [*out, {"type": "exit", "exit_code": message.exit_code}]
        if isinstance(message, cs.ProcError):
            return [self.error(message.message, fatal=False)]
        return []

    def refused(self, exc: ServiceError) -> dict[str, Any]:
        """The frame telling the client the worker refused (the stream's end)."""
        return self.error(exc.message, fatal=True)

    def error(self, text: str, *, fatal: bool) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "error", "data": text}
        if self.kind == "pty":
            frame["fatal"] = fatal
        return frame


def _text(value: Any, name: str, *, required: bool = False) -> str:
    if not isinstance(value, str) or (required and not value):
        raise FrameError(f"{name} must be a non-empty string")
    return value


def _opt_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise FrameError("expected a string")
    return value


def _strings(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FrameError("args must be a list of strings")
    return value


def _env(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FrameError("envs must be an object of strings")
    return value


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 40:
        raise FrameError(f"{name} must be a non-negative integer")
    return value


def origin_allowed(origin: str | None, host: str | None, public_url: str) -> bool:
    """May a cookie-authenticated WebSocket come from ``origin``?

    Browsers always send ``Origin`` on a WebSocket handshake; it must be the
    gateway itself (the ``Host`` connected to) or the configured public URL.
    A request without ``Origin`` is not from a browser page, so not a
    cross-site forgery.
    """
    if origin is None:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    if host and hmac.compare_digest(parts.netloc.lower(), host.lower()):
        return True
    if public_url:
        public = urlsplit(public_url)
        return (parts.scheme, parts.netloc.lower()) == (public.scheme, public.netloc.lower())
    return False


# -- the routes ------------------------------------------------------------------------------


def _id(value: str) -> str:
    return path_id(value, ApiError(404, "not_found", "capsule not found"))


def _error_response(exc: ApiError) -> Response:
    """A refused WebSocket upgrade, answered as HTTP. The server closes the connection
    after it, so say so: a client must not send its next request on it."""
    body = msgspec.json.encode({"error": {"code": exc.code, "message": exc.message}})
    return Response(body, status=exc.status, content_type="application/json",
                    headers={**(exc.headers or {}), "Connection": "close"})


def register(state: GatewayState) -> None:
    """Add the streaming file routes and the WebSockets (and document them)."""
    api, app, edge, bus = state.api, state.app, state.edge, state.bus
    config = state.config
    app.request_class = BoundedRequest
    app.asgi_http_class = BoundedHTTPConnection
    tags = ["capsules"]

    async def lookup(actor: Principal, capsule_id: str, admin: bool = False) -> tuple[str, c.Capsule]:
        reply: c.CapsuleReply = await call(state, "vmmgr", c.LookupCapsule(
            actor=actor, capsule_id=_id(capsule_id), admin=admin, operation=True))
        if reply.capsule.status != "running":
            raise ApiError(409, "not_running",
                           f"capsule {reply.capsule.id} is {reply.capsule.status}, not running")
        return f"vmmgr.{reply.host_id}", reply.capsule

    def open_stream(host: str, start: Message) -> Any:
        return bus.open_stream(host, start, timeout=10.0, window=WINDOW)

    # -- files ---------------------------------------------------------------------------

    async def stream_upload_file(id: str) -> Response:
        actor = await edge.authenticate()
        if request.mimetype != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type",
                           "the body must be multipart/form-data with path and file")
        boundary = request.mimetype_params.get("boundary", "")
        if not boundary:
            raise ApiError(400, "invalid_request", "the multipart boundary is missing")
        limit = config.max_upload_bytes
        length = request.content_length
        if length is not None and length > limit + MULTIPART_SLACK:
            raise _too_large(limit)
        host, capsule = await lookup(actor, id)
        body = request.body
        if not isinstance(body, BoundedBody):  # pragma: no cover - register() installs it
            raise ApiError(500, "internal_error", "streaming bodies are not installed")
        body.allow(limit + MULTIPART_SLACK)
        parts = _Multipart(boundary.encode(), body)
        path = request.args.get("path") or None
        received = 0
        try:
            while True:
                event = await parts.next()
                if event is None:
                    raise ApiError(400, "invalid_request", "path and file are required")
                if isinstance(event, Field) and event.name == "path":
                    path = (await parts.field_value()).decode("utf-8", "replace")
                elif isinstance(event, File) and event.name == "file":
                    break
                elif isinstance(event, (Field, File)):
                    await parts.field_value(discard=True)
            if not path:
                raise ApiError(400, "invalid_request",
                               "path is required (a form field before the file, or ?path=)")
            start = cs.StreamWriteFile(actor=actor, capsule_id=capsule.id, path=path)
            async with _bus_errors(host), open_stream(host, start) as stream:
                await _expect(stream, cs.StreamReady)
                pending = bytearray()
                try:
                    async for piece in parts.file_data():
                        received += len(piece)
                        if received > limit:
                            raise _too_large(limit)
                        pending += piece
                        if len(pending) >= FILE_FRAME:
                            await stream.send(bytes(pending))
                            pending.clear()
                    if pending:
                        await stream.send(bytes(pending))
                    await stream.send_eof()
                except (BusError, RemoteError):
                    await _expect(stream, c.CapsuleDone)  # the worker's reason, if it gave one
                    raise
                await _expect(stream, c.CapsuleDone)
        except ApiError as exc:
            if exc.status == 413:
                await _drain(parts.body)
            raise
        await parts.finish()
        return no_content()

    async def stream_download_file(id: str) -> Response:
        actor = await edge.authenticate()
        payload = await parse_body(s.ReadFileRequest)
        host, capsule = await lookup(actor, id)
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(_bus_errors(host))
            stream = await stack.enter_async_context(open_stream(
                host, cs.StreamReadFile(actor=actor, capsule_id=capsule.id, path=payload.path)))
            await _expect(stream, cs.FileStreamStarted)
        except BaseException:
            await stack.aclose()
            raise

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for frame in stream:
                    if isinstance(frame, bytes):
                        yield frame
            except ServiceError as exc:
                log.warning("download failed midway", extra={
                    "capsule_id": capsule.id, "code": exc.code, "error": exc.message})
                raise RuntimeError(exc.message) from None  # aborts the chunked response
            finally:
                await stack.aclose()

        response = Response(chunks(), status=200, content_type="application/octet-stream")
        response.timeout = None  # a large file takes as long as it takes
        return response

    api.stream(app, "POST", "/v1/capsules/{id}/files/stream/write", stream_upload_file,
               summary="Upload a file (streaming)", tags=tags, request=s.UploadForm,
               request_content="multipart/form-data", responses={204: None})
    api.route(app, "POST", "/v1/capsules/{id}/files/stream/read",
              summary="Download a file (streaming)", tags=tags, request=s.ReadFileRequest,
              responses={200: None}, streams=True)(stream_download_file)

    # -- WebSockets ------------------------------------------------------------------------

    async def ws_authenticate(admin: bool = False) -> Principal:
        key = websocket.headers.get(API_KEY_HEADER)
        if key and not admin:
            return await edge.resolve_api_key(key)
        sid = websocket.cookies.get(SESSION_COOKIE)
        if not sid:
            raise ApiError(401, "unauthorized", "authentication required")
        if not origin_allowed(websocket.headers.get("Origin"), websocket.headers.get("Host"),
                              config.public_url):
            raise ApiError(403, "origin_refused", "this origin may not open capsule WebSockets")
        principal: Principal = (await edge.resolve_session(sid)).principal
        if admin and not principal.is_admin:
            raise ApiError(403, "forbidden", "platform admin access required")
        return principal

    async def bridge(kind: Kind, capsule_id: str, selector: str | None = None,
                     admin: bool = False) -> Response | None:
        try:
            actor = await ws_authenticate(admin)
            host, capsule = await lookup(actor, capsule_id, admin)
        except ApiError as exc:
            return _error_response(exc)
        await websocket.accept()
        codec = FrameCodec(kind)
        lock = trio.Lock()

        async def send(frame: dict[str, Any]) -> None:
            async with lock:
                await websocket.send(msgspec.json.encode(frame).decode())

        op: dict[str, Any] = {"actor": actor, "capsule_id": capsule.id, "admin": admin}
        start: Message | None = None
        if kind == "process":
            assert selector is not None
            start = cs.StreamProcess(selector=selector, **op)
        else:
            with trio.move_on_after(START_TIMEOUT_S):
                while True:
                    try:
                        start = codec.start(await websocket.receive(), op)
                        break
                    except FrameError as exc:
                        await send(codec.error(str(exc), fatal=False))
            if start is None:
                await send(codec.error("no start frame", fatal=True))
                await websocket.close(1008)
                return None
        try:
            async with open_stream(host, start) as stream:
                try:
                    async with trio.open_nursery() as nursery:
                        if kind != "process":
                            nursery.start_soon(_client_to_bus, codec, stream, send)
                        pinging = False
                        try:
                            async for message in stream:
                                for frame in codec.frames(message):
                                    await send(frame)
                                if isinstance(message, cs.ProcExit):
                                    break
                                if kind == "pty" and not pinging and isinstance(message, cs.ProcStarted):
                                    # Keep-alives only once the client has its ``started`` frame.
                                    nursery.start_soon(_pings, send, config.ws_ping_s)
                                    pinging = True
                        except ServiceError as exc:  # the worker's refusal ends the stream
                            await send(codec.refused(exc))
                        nursery.cancel_scope.cancel()
                finally:
                    if kind == "pty" and not stream.peer_closed:
                        # The client went away (or we stop): detach politely, so what it
                        # sent just before closing (input, a resize) still reaches the PTY.
                        with trio.move_on_after(DETACH_TIMEOUT_S) as cleanup:
                            cleanup.shield = True
                            await _detach(codec, stream)
        except (BusTimeout, BusError, RemoteError) as exc:
            log.warning("capsule stream failed", extra={"capsule_id": capsule.id, "error": str(exc)})
            await send(codec.error("the capsule's host is unavailable", fatal=True))
        await websocket.close(1000)
        return None

    async def exec_stream(id: str) -> Response | None:
        return await bridge("exec", id)

    async def process_stream(id: str, selector: str) -> Response | None:
        return await bridge("process", id, selector)

    async def pty_session(id: str) -> Response | None:
        return await bridge("pty", id)

    async def admin_exec_stream(id: str) -> Response | None:
        return await bridge("exec", id, admin=True)

    async def admin_process_stream(id: str, selector: str) -> Response | None:
        return await bridge("process", id, selector, admin=True)

    async def admin_pty_session(id: str) -> Response | None:
        return await bridge("pty", id, admin=True)

    for path, view, summary in (
        ("/v1/capsules/{id}/exec/stream", exec_stream, "Stream command execution via WebSocket"),
        ("/v1/capsules/{id}/processes/{selector}/stream", process_stream,
         "Stream process output via WebSocket"),
        ("/v1/capsules/{id}/pty", pty_session, "Interactive PTY session via WebSocket"),
        ("/v1/admin/capsules/{id}/exec/stream", admin_exec_stream,
         "Stream command execution on any capsule (admin)"),
        ("/v1/admin/capsules/{id}/processes/{selector}/stream", admin_process_stream,
         "Stream process output of any capsule (admin)"),
        ("/v1/admin/capsules/{id}/pty", admin_pty_session, "PTY session on any capsule (admin)"),
    ):
        api.stream(app, "GET", path, view, websocket=True, summary=summary, tags=tags,
                   responses={101: None, 404: Error, 409: Error})


# -- helpers -----------------------------------------------------------------------------


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the file is larger than the upload limit ({limit} bytes)")


class _bus_errors:
    """Bus failures of a stream as the API's errors (503 when the host is unavailable)."""

    def __init__(self, host: str) -> None:
        self.host = host

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, BusTimeout):
            raise ApiError(503, "service_unavailable", f"{self.host} did not answer in time") from None
        if isinstance(exc, (BusError, RemoteError)):
            raise ApiError(502, "stream_failed", f"the stream to {self.host} failed: {exc}") from None
        return False


async def _expect(stream: Any, kind: type) -> Any:
    """The worker's next message, which must be ``kind``; its refusal becomes the API's error."""
    try:
        message = await stream.receive()
    except trio.EndOfChannel:
        raise ApiError(502, "stream_failed", "the capsule's host ended the stream early") from None
    except ServiceError as exc:
        raise api_error(exc) from None
    if not isinstance(message, kind):
        raise ApiError(502, "stream_failed", f"unexpected {type(message).__name__} on the stream")
    return message


async def _drain(body: BoundedBody) -> None:
    """Read (and drop) what is left of a refused upload, so the client reads the 413."""
    taken = 0
    with trio.move_on_after(10):
        async for piece in body:
            taken += len(piece)
            if taken > DRAIN_LIMIT:
                return


async def _client_to_bus(codec: FrameCodec, stream: Any,
                         send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    while True:
        raw = await websocket.receive()
        try:
            message = codec.control(raw)
        except FrameError as exc:
            if str(exc):
                await send(codec.error(str(exc), fatal=False))
            continue
        await stream.send(message)


def _pending_client_frames() -> list[str | bytes]:
    """Frames the client sent that the route has not read yet (without waiting).

    Quart-Trio queues a WebSocket's incoming messages in a memory channel and
    cancels the route as soon as the client disconnects, so frames sent just
    before the close can still sit there.
    """
    channel = getattr(getattr(websocket, "_receive", None), "__self__", None)
    receive_nowait = getattr(channel, "receive_nowait", None)
    frames: list[str | bytes] = []
    if receive_nowait is None:
        return frames
    while True:
        try:
            frames.append(receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return frames


async def _detach(codec: FrameCodec, stream: Any) -> None:
    """Forward the client's last control frames, tell the worker with EOF, wait for its end."""
    try:
        for raw in _pending_client_frames():
            try:
                await stream.send(codec.control(raw))
            except FrameError:
                continue
        await stream.send_eof()
        async for _ in stream:  # the worker detaches and ends the stream
            pass
    except (BusError, ServiceError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _pings(send: Callable[[dict[str, Any]], Awaitable[None]], every_s: float) -> None:
    while True:
        await trio.sleep(every_s)
        await send({"type": "ping"})


class _Multipart:
    """A multipart/form-data body parsed as it arrives (werkzeug's sans-IO decoder)."""

    def __init__(self, boundary: bytes, body: BoundedBody) -> None:
        self.body = body
        self._decoder = MultipartDecoder(boundary)  # field sizes: field_value()
        self._chunks = body.__aiter__()
        self._ended = False

    async def next(self) -> Any:
        """The next event (Field, File, Data, Epilogue), or None at the end of the body."""
        while True:
            try:
                event = self._decoder.next_event()
            except ValueError as exc:
                raise ApiError(400, "invalid_request", f"malformed multipart body: {exc}") from None
            if event is not NEED_DATA:
                return event
            if self._ended:
                return None
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._ended = True
                self._decoder.receive_data(None)
                continue
            self._decoder.receive_data(chunk)

    async def field_value(self, *, discard: bool = False) -> bytes:
        value = bytearray()
        async for piece in self.file_data():
            if not discard:
                value += piece
                if len(value) > MULTIPART_SLACK:
                    raise ApiError(400, "invalid_request", "a form field is too large")
        return bytes(value)

    async def file_data(self) -> AsyncIterator[bytes]:
        """The data of the current part, as it arrives."""
        while True:
            event = await self.next()
            if not isinstance(event, Data):
                raise ApiError(400, "invalid_request", "the multipart body ended in a part")
            if event.data:
                yield event.data
            if not event.more_data:
                return

    async def finish(self) -> None:
        """Read the rest of the body (later parts are ignored)."""
        while True:
            event = await self.next()
            if event is None or isinstance(event, Epilogue):
                return
