"""Helpers every route uses: parse a body, describe the client, call a service.

Bodies are decoded straight into the request's msgspec Struct (unknown fields
refused), so validation and the OpenAPI document come from one type. Service
refusals (:class:`Failure`) become :class:`ApiError` with the service's status
and code; a service that does not answer becomes 503.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from quart import Response, request

from dovecote.bus import BusError, BusTimeout, RemoteError
from dovecote.bus.messages import ClientInfo, Failure, Message
from dovecote.gateway.errors import ApiError
from dovecote.gateway.state import GatewayState

T = TypeVar("T")


async def parse_body(body_type: type[T]) -> T:
    """Decode the JSON body into ``body_type``, or answer 400/413/415."""
    content_type = request.mimetype or ""
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    raw = await request.get_data(cache=False)
    if not raw:
        raise ApiError(400, "invalid_request", "a JSON body is required")
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    except msgspec.DecodeError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


def client_info() -> ClientInfo:
    """The HTTP client of the current request."""
    ip = request.remote_addr or ""
    return ClientInfo(ip=ip, user_agent=request.headers.get("User-Agent", "")[:512])


async def call(state: GatewayState, service: str, message: Message, *,
               timeout_s: float = 10.0) -> Any:
    """Send ``message`` to ``service`` and return the reply, raising ApiError on refusal."""
    try:
        reply = await state.bus.request(service, message, timeout=timeout_s)
    except BusTimeout:
        raise ApiError(503, "service_unavailable", f"{service} did not answer in time") from None
    except RemoteError as exc:
        if exc.code in ("no_worker", "worker_lost", "shutting_down"):
            raise ApiError(503, "service_unavailable", f"{service} is unavailable") from None
        raise ApiError(500, "internal_error", "internal error") from None
    except BusError:
        raise ApiError(503, "service_unavailable", f"{service} is unavailable") from None
    if isinstance(reply, Failure):
        headers = {"Retry-After": str(reply.retry_after)} if reply.retry_after else None
        raise ApiError(reply.status, reply.code, reply.message, headers)
    return reply


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response from a Struct, dict or list."""
    return Response(msgspec.json.encode(body), status=status, content_type="application/json")


def no_content() -> Response:
    """An empty 204 response."""
    return Response(b"", status=204)
