"""The agent runtime's hot routes served as plain ASGI, in front of Quart.

An agent's loop is ``claim-next``, ``heartbeat``, ``complete`` (or ``fail``,
``release``) and channel ``send``/``recv``: small JSON requests, one bus
request each. Measured with py-spy, the route's own work (identity, body
decode, the bus request, the JSON answer) was about a sixth of the
gateway's CPU per request; most of the rest was Quart's per-request
machinery around it: the request object (werkzeug ``Headers`` of every
header, the URL adapter and rule matching), the request and app contexts,
signals, the before/after hooks, ``make_response`` and the response's
trip back through ASGI.

:class:`FastPath` wraps the app's ``asgi_app`` (Quart's documented
middleware point). A request whose method and path match a route declared
with ``Route(fast=True)`` (:mod:`dovecote.gateway.routing`) is served here;
everything else (other routes, other methods, ``HEAD``/``OPTIONS``, a
``root_path``, WebSockets, lifespan) goes to Quart unchanged. There is
still one declaration per route: the route stays registered with Quart and
in ``/openapi.json``, and the fast path calls the *same generated view*
(``register_routes``'s, with its family's wrapper), so identity, body
parsing, the bus message, the reply's encoding, status codes and error
shapes are the route table's, not a second copy. What this module does
instead of Quart is what the app does around every view (``gateway/app.py``):

* ``X-Request-Id``: the client's (64 printable characters, no space) or a new
  one, bound for logs and echoed on the answer;
* a NUL in the path or the query is 400 (in the family's error shape);
* the body: into the same ``Body`` class Quart uses (``MAX_CONTENT_LENGTH``
  is 413, ``BODY_TIMEOUT`` 408), and an answer given before the body was
  read settles the connection the same way (``app._settle_body``). When
  hypercorn has already queued the whole body (a small request comes in one
  segment) it is taken at once and the view runs in the request's own task;
  otherwise, and always for a long poll (a route whose ``timeout_s``
  depends on the call: ``recv?wait=``, ``claim-next`` with ``wait``),
  Quart's own ASGI reader runs beside the view, and the client's disconnect
  cancels the request, as under Quart;
* errors escaping the view: a Dovecote error through ``api_error``, an HTTP
  one (413, 408) with its status, anything else logged and 500, all
  rendered by the path's error shape (``ApiRegistry.render_error``);
* the ``dovecote_http_requests`` / ``..._duration_seconds`` metrics, labelled
  with the same route template.

The view sees Quart's ``request`` as a :class:`FastRequest`, a small object
with the attributes these routes read (headers, path, query, scope,
mimetype, the body), bound to Quart's request context variable for the
request's task. ``tests/agents/test_fast_path.py`` holds the fast answers to
Quart's: the same header set, the same error shapes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import msgspec
import trio
from quart import Response
from quart.globals import _cv_request
from quart.utils import encode_headers
from werkzeug.datastructures import ImmutableMultiDict
from werkzeug.exceptions import HTTPException, RequestTimeout
from werkzeug.http import parse_options_header
from werkzeug.sansio.utils import get_content_length

from dovecote.gateway.calls import refuse_nul
from dovecote.gateway.errors import STATUS_CODES, api_error
from dovecote.gateway.routes.metrics import HTTP_REQUESTS, HTTP_SECONDS
from dovecote.gateway.state import GatewayState
from dovecote.libs.context import new_request_id, request_id
from dovecote.libs.errors import DovecoteError, ServiceError
from dovecote.libs.logs import get_logger

__all__ = ["FastPath", "FastRequest"]

log = get_logger("dovecote.gateway")

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class FastHeaders:
    """The request's headers, looked up case-insensitively (the first of repeated ones, as werkzeug's)."""

    __slots__ = ("_map",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        found: dict[str, str] = {}
        for name, value in raw:
            key = name.decode("latin1").lower()
            if key not in found:
                found[key] = value.decode("latin1")
        self._map = found

    def get(self, key: str, default: Any = None) -> Any:
        return self._map.get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return self._map[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._map

    def items(self) -> list[tuple[str, str]]:
        return list(self._map.items())


class FastRequest:
    """What the fast routes' code reads of Quart's ``request``: the same names, the same meanings."""

    __slots__ = ("_args", "_mimetype", "body", "body_timeout", "headers", "method", "path",
                 "query_string", "scope")

    def __init__(self, scope: dict[str, Any], body: Any, body_timeout: float | None) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query_string: bytes = scope.get("query_string", b"")
        self.headers = FastHeaders(scope["headers"])
        self.body = body
        self.body_timeout = body_timeout
        self._args: ImmutableMultiDict[str, str] | None = None
        self._mimetype: str | None = None

    @property
    def args(self) -> ImmutableMultiDict[str, str]:
        """The query parameters, parsed as werkzeug's ``Request.args``."""
        if self._args is None:
            self._args = ImmutableMultiDict(parse_qsl(
                self.query_string.decode(), keep_blank_values=True, errors="werkzeug.url_quote"))
        return self._args

    @property
    def mimetype(self) -> str:
        if self._mimetype is None:
            self._mimetype = parse_options_header(self.headers.get("Content-Type", ""))[0].lower()
        return self._mimetype

    @property
    def content_type(self) -> str | None:
        value: str | None = self.headers.get("Content-Type")
        return value

    @property
    def content_length(self) -> int | None:
        return get_content_length(self.headers.get("Content-Length"),
                                  self.headers.get("Transfer-Encoding"))

    async def get_data(self, cache: bool = True) -> bytes:
        """The whole body (quart-trio's ``get_data``: 408 after ``BODY_TIMEOUT``, 413 past the limit)."""
        timeout = float("inf") if self.body_timeout is None else self.body_timeout
        with trio.move_on_after(timeout) as scope:
            raw: bytes = await self.body
        if scope.cancelled_caught:
            raise RequestTimeout()
        if not cache:
            self.body.clear()
        return raw


@dataclass(slots=True)
class _Context:
    """Stands for Quart's request context: ``quart.request`` resolves to ``.request``."""

    request: FastRequest


@dataclass(frozen=True, slots=True)
class FastRoute:
    method: str
    pattern: re.Pattern[str]
    prefix: str
    rule: str
    """Quart's rule (the metrics' route label)."""
    view: Callable[..., Awaitable[Any]]
    long_poll: bool
    """Its timeout depends on the call (``Route.timeout_s`` callable): watched for the client's
    disconnect all along, as Quart does."""


_COMPLETE, _WAIT, _GONE = object(), object(), object()


def _take_body(req: FastRequest, receive: Any) -> object:
    """Take what hypercorn has queued of the body, without waiting: ``_COMPLETE`` when that is the
    whole body, ``_GONE`` when the client has gone, else ``_WAIT`` (Quart's reader takes over)."""
    take = getattr(getattr(receive, "__self__", None), "receive_nowait", None)
    if take is None:
        return _WAIT
    try:
        message = take()
    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
        return _WAIT
    if message["type"] != "http.request":
        return _GONE
    req.body.append(message.get("body", b""))
    if message.get("more_body", False):
        return _WAIT
    req.body.set_complete()
    return _COMPLETE


def fast_routes(state: GatewayState) -> list[FastRoute]:
    """The routes declared ``fast=True``, from the app's registered operations (view and all)."""
    routes = []
    for op in state.api.operations:
        declared = op.declared
        if declared is None or not getattr(declared, "fast", False):
            continue
        pattern = "".join(
            f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("{") else re.escape(part)
            for part in re.split(r"(\{[^{}]+\})", op.path) if part)
        routes.append(FastRoute(method=op.method.upper(), pattern=re.compile(pattern + r"\Z"),
                                prefix=op.path.split("{", 1)[0],
                                rule=op.path.replace("{", "<").replace("}", ">"), view=op.view,
                                long_poll=callable(declared.timeout_s)))
    return routes


class FastPath:
    """An ASGI app serving the fast routes itself and handing everything else to ``app``."""

    def __init__(self, state: GatewayState, app: ASGIApp,
                 settle: Callable[[Response], Awaitable[Response]]) -> None:
        self.state = state
        self.app = app
        self.settle = settle
        """The app's ``_settle_body`` (reads Quart's ``request``: the :class:`FastRequest` here)."""
        self.routes = fast_routes(state)
        self.prefixes = tuple({route.prefix for route in self.routes})
        quart = state.app
        self.max_body: int | None = quart.config["MAX_CONTENT_LENGTH"]
        self.body_timeout: float | None = quart.config["BODY_TIMEOUT"]
        self.response_timeout: float | None = quart.config["RESPONSE_TIMEOUT"]

    def match(self, scope: dict[str, Any]) -> tuple[FastRoute, dict[str, str]] | None:
        if scope["type"] != "http" or scope.get("root_path"):
            return None
        path: str = scope["path"]
        if not path.startswith(self.prefixes):
            return None
        method = scope["method"]
        for route in self.routes:
            if route.method == method:
                found = route.pattern.match(path)
                if found is not None:
                    return route, found.groupdict()
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        matched = self.match(scope)
        if matched is None:
            await self.app(scope, receive, send)
            return
        route, params = matched
        started = time.perf_counter()
        quart = self.state.app
        req = FastRequest(scope, None, self.body_timeout)
        req.body = quart.request_class.body_class(req.content_length, self.max_body)
        token = _cv_request.set(_Context(req))  # type: ignore[arg-type]
        try:
            rid = req.headers.get("X-Request-Id", "")[:64]
            request_id.set(rid if rid and rid.isprintable() and " " not in rid else new_request_id())
            arrived = _take_body(req, receive) if not route.long_poll else _WAIT
            if arrived is _COMPLETE:  # nothing more to read, a short call: no reader task
                await self._answer(None, route, params, req, send, started)
                return
            if arrived is _GONE:
                return
            reader = quart.asgi_http_class(quart, scope)  # Quart's own body reader (and disconnect watch)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.handle_messages, nursery, req, receive)
                nursery.start_soon(self._answer, nursery, route, params, req, send, started)
        finally:
            _cv_request.reset(token)

    async def _answer(self, nursery: trio.Nursery | None, route: FastRoute, params: dict[str, str],
                      req: FastRequest, send: Any, started: float) -> None:
        try:
            refuse_nul(req.path)
            for key, value in req.args.items(multi=True):
                refuse_nul(key + value)
            response = await route.view(**params)
        except DovecoteError as exc:
            err = api_error(exc)
            if not isinstance(exc, ServiceError):
                log.warning("bus error reached the app", extra={"path": req.path, "error": repr(exc)})
            response = self._error(req.path, err.status, err.code, err.message, err.headers)
        except HTTPException as exc:
            status = exc.code or 500
            response = self._error(req.path, status, STATUS_CODES.get(status, "error"),
                                   exc.description or "")
        except Exception:
            log.exception("unhandled error", extra={"path": req.path})
            response = self._error(req.path, 500, "internal_error", "internal error")
        rid = request_id.get()
        if rid:
            response.headers["X-Request-Id"] = rid
        response = await self.settle(response)
        HTTP_REQUESTS.labels(req.method, route.rule, str(response.status_code)).inc()
        HTTP_SECONDS.labels(req.method, route.rule).observe(time.perf_counter() - started)
        body = await response.get_data()
        timeout = float("inf") if self.response_timeout is None else self.response_timeout
        with trio.move_on_after(timeout):
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": encode_headers(response.headers)})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        if nursery is not None:
            nursery.cancel_scope.cancel()

    def _error(self, path: str, status: int, code: str, message: str,
               headers: dict[str, str] | None = None) -> Response:
        """The app's ``_json_error``: the path's error shape, else the platform's."""
        own = self.state.api.render_error(path, status, code, message)
        if own is not None:
            own.headers.update(headers or {})
            return own
        body = msgspec.json.encode({"error": {"code": code, "message": message}})
        return Response(body, status=status, content_type="application/json", headers=headers)
