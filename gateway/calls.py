"""Helpers every route uses: parse a body, describe the client, call a service.

Bodies are decoded straight into the request's msgspec Struct (unknown fields
refused), so validation and the OpenAPI document come from one type.
:func:`call` returns the request's declared reply; a refusal, a silent or
missing service, a crash become :class:`ApiError` through the one mapping,
:func:`~dovecote.gateway.errors.api_error`.
"""

from __future__ import annotations

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
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    except msgspec.DecodeError:
        if content_type == FORM_TYPE:
            raise ApiError(415, "unsupported_media_type",
                           "the body must be JSON (this one is a form); "
                           "send Content-Type: application/json") from None
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


def parse_query(query_type: type[T]) -> T:
    """Decode the query string into ``query_type`` (empty values are absent), or answer 400."""
    args = {k: v for k, v in request.args.items() if v != ""}
    try:
        return msgspec.convert(args, type=query_type, strict=False)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None


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
