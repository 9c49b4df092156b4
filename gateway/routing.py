"""The gateway's route table: each HTTP→bus route declared once.

A :class:`Route` names the method, path, request body type, query Struct,
the bus message built from the call, the documented response type and
status; a :class:`Family` names what its routes share (tags, how the caller
is authenticated, the service asked, the error shape). :func:`register_routes`
generates from the same entries both the Quart views and their OpenAPI
operations, so the body a view parses is the one the document describes, and
no view is served undocumented.

A generated view runs, in order::

    actor = auth()                 # Family.auth or Route.auth (AuthKind or a callable)
    params = Route.ids(...)        # path parameters checked before the body, where the route says so
    body  = parse(Route.request)   # 400/413/415 in the documented shape; optional_body: {} when empty
    query = parse_query(Route.query)
    reply = send(Route.message(call), timeout)   # or Route.handle(call) for routes with logic
    return Route.reply(reply) or Family.encode(reply), as JSON with Route.status
           (a Response is sent as it is; status 204 with no response type is an empty 204)

Hand-written views remain only for streams (SSE, WebSockets, the CDP and
live-view relays, streaming up/downloads) and say so:
``ApiRegistry.route(..., streams=True)`` or :meth:`ApiRegistry.stream`.
``tests/gateway/test_openapi_complete.py`` holds both kinds to the document.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from quart import Response, request
from werkzeug.sansio.response import Response as AnyResponse

from dovecote.gateway.calls import call, json_response, no_content, parse_body, parse_query
from dovecote.gateway.state import GatewayState

__all__ = ["AuthKind", "Call", "Family", "Route", "path_id", "register_routes"]

MAX_PATH_ID = 64

AuthKind = Literal["key_or_session", "session", "admin", "host", "public"]
"""``key_or_session``: ``X-API-Key`` or the session cookie (CSRF on changes);
``session``: a signed-in session only (a key is 403); ``admin``: a platform
admin's session; ``host``: a host's ``X-Host-Token``; ``public``: no caller."""

Auth = AuthKind | Callable[[], Any]
"""An auth kind, or a callable returning the caller (or an awaitable of it)."""


@dataclass(slots=True)
class Call:
    """What a route's message builder sees: the caller, the parsed body and query, the path."""

    actor: Any
    body: Any
    query: Any
    params: dict[str, str]
    state: GatewayState


@dataclass(frozen=True, kw_only=True)
class Route:
    """One HTTP→bus route, declared once."""

    method: str
    path: str
    """OpenAPI's ``{name}`` placeholders (Quart's ``<name>`` converters are derived)."""
    name: str
    """The operation id (and the Quart endpoint, with the method)."""
    summary: str
    ids: dict[str, Callable[[str], str]] = field(default_factory=dict)
    """Path parameters checked (and normalised) right after auth, before the body is read."""
    message: Callable[[Call], Any] | None = None
    """Build the bus message sent to the family's (or the route's) service."""
    handle: Callable[[Call], Awaitable[Any]] | None = None
    """Instead of ``message``: a route with logic of its own; returns the reply (or a Response)."""
    request: Any = None
    """The JSON body's Struct: parsed by the view, documented as the request body."""
    optional_body: bool = False
    """An empty body is taken as ``{}`` (decoded into ``request``)."""
    parse: Callable[[Any], Awaitable[Any]] | None = None
    """How the body is read (default: the family's, :func:`parse_body`); must decode into ``request``."""
    request_content: str = "application/json"
    query: Any = None
    """A Struct of query parameters: parsed by the view (:func:`parse_query`) and documented."""
    parse_query: bool = True
    """False when the message builder reads the query itself (it is still documented)."""
    response: Any = None
    """The documented body of ``status`` (None: no body)."""
    status: int = 200
    responses: dict[int, Any] = field(default_factory=dict)
    """Other documented statuses and their bodies."""
    descriptions: dict[int, str] = field(default_factory=dict)
    reply: Callable[[Any], Any] | None = None
    """The body sent from the service's reply (default: the family's ``encode``)."""
    auth: Auth | None = None
    """Overrides the family's."""
    service: str | None = None
    """Overrides the family's."""
    send: Callable[[Call, Any, float], Awaitable[Any]] | None = None
    """Overrides the family's (e.g. a capsule operation goes to the vmmgr that runs it)."""
    timeout_s: float | Callable[[Call], float] | None = None
    tags: list[str] | None = None
    fast: bool = False
    """Also served by the ASGI fast path in front of Quart (:mod:`dovecote.gateway.fastpath`), through
    this same generated view: for hot routes whose code reads only what a ``FastRequest`` has. One
    with a callable ``timeout_s`` is taken for a long poll (watched for the client's disconnect)."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """What a group of routes shares."""

    tags: list[str]
    service: str = ""
    auth: Auth = "key_or_session"
    timeout_s: float = 10.0
    send: Callable[[Call, Any, float], Awaitable[Any]] | None = None
    """How a message is sent (default: :func:`call` to the service)."""
    parse: Callable[[Any], Awaitable[Any]] = parse_body
    encode: Callable[[Any], Any] = lambda reply: reply
    """The body sent from a reply when the route has no ``reply``."""
    document: Callable[[Any], Any] = lambda response: response
    """The documented type of a route's ``response``."""
    wrap: Callable[[Callable[..., Awaitable[Response]]], Callable[..., Awaitable[Response]]] | None = None
    """Wraps every view (e.g. to render errors in another system's shape)."""
    error: Any = None
    """The documented error body (the platform's ``Error`` when unset)."""
    security: bool | None = None
    """Whether the document lists the API key/session security (default: unless auth is public or custom)."""


def path_id(value: str, error: Exception, max_length: int = MAX_PATH_ID) -> str:
    """``value`` if it is a path identifier (1 to ``max_length`` printable characters), else raise
    ``error``."""
    if not value or len(value) > max_length or not value.isprintable():
        raise error
    return value


def _authenticate(state: GatewayState, auth: Auth) -> Callable[[], Awaitable[Any]]:
    edge = state.edge
    if auth == "key_or_session":
        return edge.authenticate
    if auth == "session":
        return functools.partial(edge.authenticate, session_only=True)
    if auth == "admin":
        return edge.platform_admin
    if auth == "host":
        return edge.authenticate_host
    if auth == "public":
        async def nobody() -> None:
            return None
        return nobody
    custom = auth

    async def resolve() -> Any:
        actor = custom()
        return await actor if isinstance(actor, Awaitable) else actor

    return resolve


def _empty_body() -> bool:
    return not request.content_length and "chunked" not in request.headers.get("Transfer-Encoding", "")


def make_view(state: GatewayState, family: Family, route: Route) -> Callable[..., Awaitable[Response]]:
    """The Quart view of ``route``."""
    if (route.message is None) == (route.handle is None):
        raise ValueError(f"{route.name}: give exactly one of message and handle")
    authenticate = _authenticate(state, route.auth if route.auth is not None else family.auth)
    parse = route.parse or family.parse
    service = route.service or family.service
    timeout = route.timeout_s if route.timeout_s is not None else family.timeout_s
    send = route.send or family.send

    async def view(**params: str) -> Response:
        actor = await authenticate()
        for name, check in route.ids.items():
            params[name] = check(params[name])
        body = None
        if route.request is not None:
            if route.optional_body and _empty_body():
                body = msgspec.convert({}, route.request)
            else:
                body = await parse(route.request)
        query = parse_query(route.query) if route.query is not None and route.parse_query else None
        ctx = Call(actor=actor, body=body, query=query, params=params, state=state)
        if route.handle is not None:
            reply = await route.handle(ctx)
        else:
            assert route.message is not None
            message = route.message(ctx)
            timeout_s = timeout(ctx) if callable(timeout) else timeout
            if send is not None:
                reply = await send(ctx, message, timeout_s)
            else:
                reply = await call(state, service, message, timeout_s=timeout_s)
        if isinstance(reply, AnyResponse):
            return reply  # type: ignore[return-value]
        result = route.reply(reply) if route.reply is not None else family.encode(reply)
        if isinstance(result, AnyResponse):
            return result  # type: ignore[return-value]  # e.g. quart.redirect's
        if route.response is None and route.status == 204:
            return no_content()
        return json_response(result, route.status)

    view.__name__ = route.name
    view.__qualname__ = route.name
    return family.wrap(view) if family.wrap is not None else view


def register_routes(state: GatewayState, family: Family, routes: list[Route]) -> None:
    """Serve and document every route of ``routes``."""
    for route in routes:
        view = make_view(state, family, route)
        auth = route.auth if route.auth is not None else family.auth
        security = family.security if family.security is not None else (
            isinstance(auth, str) and auth != "public")
        response = family.document(route.response) if route.response is not None else None
        state.api.route(
            state.app, route.method, route.path, summary=route.summary,
            tags=route.tags or family.tags, request=route.request,
            request_content=route.request_content, query=route.query,
            responses={route.status: response, **route.responses},
            security=security, error=family.error, descriptions=route.descriptions,
            declared=route,
        )(view)
