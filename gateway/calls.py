"""Helpers every route uses: parse a body, describe the client, call a service.

Bodies are decoded straight into the request's msgspec Struct (unknown fields
refused), so validation and the OpenAPI document come from one type.
:func:`call` returns the request's declared reply; a refusal, a silent or
missing service, a crash become :class:`ApiError` through the one mapping,
:func:`~dovecote.gateway.errors.api_error`.

Values no service can carry are refused here, at decode, with 400
``invalid_request``: text with a NUL character (``\u0000`` in JSON, ``%00`` in
a query; PostgreSQL cannot store it in a text column) and integers outside 64
bits (msgspec's JSON decoder takes them, but neither the bus's MessagePack nor
a ``bigint`` column can). Let through, either was a 500 deep inside whichever
service got it (:func:`refuse_unstorable`). Every JSON body goes through
:func:`decode_json` (``parse_body`` and the routes that decode their own); the
app checks every path and query string before any view runs.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, TypeVar, overload

import msgspec
from quart import Response, request

from dovecote.bus.messages import ClientInfo, Message
from dovecote.bus.messages.base import R, Request
from dovecote.gateway.errors import ApiError, api_error
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import DovecoteError

T = TypeVar("T")


FORM_TYPE = "application/x-www-form-urlencoded"
NUL_MESSAGE = "text must not contain NUL characters (\\u0000)"
INT_MESSAGE = "integers must fit in 64 bits"
_SUSPECT = re.compile(rb"\\u0000|[0-9]{19,}")
"""What an unstorable value looks like in JSON text (raw control characters are not valid JSON)."""


def unstorable(value: Any) -> str | None:
    """Why a decoded JSON value cannot be carried (a NUL in a string or key, an int past 64 bits), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return NUL_MESSAGE
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not -(2**63) <= item < 2**63:
                return INT_MESSAGE
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def refuse_nul(text: str) -> None:
    """Raise 400 ``invalid_request`` if ``text`` has a NUL character."""
    if "\x00" in text:
        raise ApiError(400, "invalid_request", NUL_MESSAGE)


def refuse_unstorable(raw: bytes | str) -> None:
    """Raise 400 ``invalid_request`` if the JSON document ``raw`` holds a value :func:`unstorable` names.

    The document is looked into only when its text has a ``\\u0000`` escape
    or a run of 19 digits somewhere: the common case costs one regex scan.
    """
    if not _SUSPECT.search(raw.encode() if isinstance(raw, str) else raw):
        return
    try:
        decoded = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return  # not JSON: the typed decode says so
    problem = unstorable(decoded)
    if problem is not None:
        raise ApiError(400, "invalid_request", problem)


def decode_json(raw: bytes | str, body_type: type[T]) -> T:
    """Decode a JSON body into ``body_type``; 400 ``invalid_request``/``invalid_json`` otherwise."""
    refuse_unstorable(raw)
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    except msgspec.DecodeError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


async def parse_body(body_type: type[T]) -> T:
    """Decode the JSON body into ``body_type``, or answer 400/413/415.

    A body labelled JSON (``application/json``, ``*+json``) must be JSON. One
    with no content type, or the form type ``curl -d`` sends, is accepted when
    it is JSON (a real form is 415), except from a browser page of another
    site (``Sec-Fetch-Site: cross-site``): such a request skips the CORS
    preflight only because its type is not JSON, so it stays refused.
    """
    content_type = request.mimetype or ""
    labelled = content_type == "application/json" or content_type.endswith("+json")
    if not labelled and content_type not in ("", FORM_TYPE):
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    if not labelled and request.headers.get("Sec-Fetch-Site", "") == "cross-site":
        raise ApiError(415, "unsupported_media_type",
                       "a cross-site request must send Content-Type: application/json")
    raw = await request.get_data(cache=False)
    if not raw:
        raise ApiError(400, "invalid_request", "a JSON body is required")
    try:
        return decode_json(raw, body_type)
    except ApiError as exc:
        if exc.code == "invalid_json" and content_type == FORM_TYPE:
            raise ApiError(415, "unsupported_media_type",
                           "the body must be JSON (this one is a form); "
                           "send Content-Type: application/json") from None
        raise


def parse_query(query_type: type[T]) -> T:
    """Decode the query string into ``query_type`` (empty values are absent), or answer 400."""
    args = {k: v for k, v in request.args.items() if v != ""}
    try:
        query = msgspec.convert(args, type=query_type, strict=False)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    problem = unstorable(msgspec.to_builtins(query))
    if problem is not None:
        raise ApiError(400, "invalid_request", problem)
    return query


def client_info() -> ClientInfo:
    """The HTTP client of the current request."""
    ip = request.remote_addr or ""
    return ClientInfo(ip=ip, user_agent=request.headers.get("User-Agent", "")[:512])


@overload
async def call(state: GatewayState, service: str, message: Request[R], *,
               timeout_s: float = 10.0) -> R: ...


@overload
async def call(state: GatewayState, service: str, message: Message, *,
               timeout_s: float = 10.0) -> Any: ...


async def call(state: GatewayState, service: str, message: Message, *,
               timeout_s: float = 10.0) -> Any:
    """Send ``message`` to ``service`` and return its declared reply.

    Raises:
        ApiError: the service refused (its status and code), did not answer
            or is not there (503), or failed (500); see :func:`api_error`.
    """
    try:
        return await state.bus.request(service, message, timeout=timeout_s)
    except DovecoteError as exc:
        raise api_error(exc, service) from None


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response from a Struct, dict or list."""
    return Response(msgspec.json.encode(body), status=status, content_type="application/json")


def no_content() -> Response:
    """An empty 204 response."""
    return Response(b"", status=204)


def sse_response(frames: AsyncIterator[bytes]) -> Response:
    """A ``text/event-stream`` of ``frames``: unbuffered, no time limit (it lasts while the client stays)."""
    response = Response(frames, status=200, content_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None
    return response
