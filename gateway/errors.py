"""Errors of the public API, in the capsules reference's shape.

Every error leaves the gateway as ``{"error": {"code": ..., "message": ...}}``
with a 4xx or 5xx status. Handlers raise :class:`ApiError` (or let a
:class:`~dovecote.libs.errors.ServiceError` from a bus call through); the app
turns it, any other Dovecote error (:func:`api_error`, the one mapping),
Quart's own HTTP exceptions and anything unexpected into that shape, so a
client never sees an HTML error page or a traceback.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dovecote.bus.errors import BusError, BusTimeout, RemoteError
from dovecote.libs.errors import DovecoteError, ServiceError


class ErrorBody(msgspec.Struct):
    """The inner error object."""

    code: str
    message: str


class Error(msgspec.Struct):
    """The error envelope of the capsules API."""

    error: ErrorBody


class ApiError(ServiceError):
    """An error that becomes an HTTP response with the documented shape.

    Part of the one tree (``libs/errors.py``): a :class:`ServiceError` with
    the response's extra headers.
    """

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, code, message)
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON body of the response."""
        return {"error": {"code": self.code, "message": self.message}}

    def __reduce__(self) -> Any:
        return (type(self), (self.status, self.code, self.message, self.headers))


# Bus codes that mean "the service is not there right now" (answered 503).
_UNAVAILABLE = frozenset({"no_worker", "worker_lost", "shutting_down"})


def api_error(exc: DovecoteError, service: str = "") -> ApiError:
    """The HTTP answer to any Dovecote error: the one mapping of the gateway.

    A refusal keeps its status and code (``Retry-After`` for ``retry_after``);
    a service that does not answer, or is not there, is 503; a handler that
    crashed is 500 (no detail leaks); anything else on the bus is 503.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ServiceError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return ApiError(exc.status, exc.code, exc.message, headers)
    who = service or "a service"
    if isinstance(exc, BusTimeout):
        return ApiError(503, "service_unavailable", f"{who} did not answer in time")
    if isinstance(exc, RemoteError) and exc.code not in _UNAVAILABLE:
        return ApiError(500, "internal_error", "internal error")
    if isinstance(exc, BusError):
        return ApiError(503, "service_unavailable", f"{who} is unavailable")
    return ApiError(500, "internal_error", "internal error")


# Quart/werkzeug HTTP status -> the code word clients see.
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}
