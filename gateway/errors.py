"""Errors of the public API, in the capsules reference's shape.

Every error leaves the gateway as ``{"error": {"code": ..., "message": ...}}``
with a 4xx or 5xx status. Handlers raise :class:`ApiError`; the app turns it,
Quart's own HTTP exceptions and anything unexpected into that shape, so a
client never sees an HTML error page or a traceback.
"""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct):
    """The inner error object."""

    code: str
    message: str


class Error(msgspec.Struct):
    """The error envelope of the capsules API."""

    error: ErrorBody


class ApiError(Exception):
    """An error that becomes an HTTP response with the documented shape."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON body of the response."""
        return {"error": {"code": self.code, "message": self.message}}


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
