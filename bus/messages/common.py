"""Messages every domain shares: a refused request, the caller, the client."""

from __future__ import annotations

from typing import Any

from dovecote.libs.errors import ServiceError

from .base import Family, Message


class Failure(Message, tag="common.failure", kw_only=True):
    """The wire form of a refusal (:class:`~dovecote.libs.errors.ServiceError`).

    Code never handles it: a handler raises ``ServiceError``, the bus sends
    this in place of the reply (or as a stream's last frame), and the
    receiving side raises the ``ServiceError`` again (:func:`refusal`).
    ``status`` is the HTTP status, ``code`` the stable error code,
    ``retry_after`` (seconds) accompanies 429, ``details`` is optional data.
    """

    status: int
    code: str
    message: str
    retry_after: int | None = None
    details: dict[str, Any] | None = None


def failure_of(exc: ServiceError) -> Failure:
    """The wire form of a refusal."""
    return Failure(status=exc.status, code=exc.code, message=exc.message,
                   retry_after=exc.retry_after, details=exc.details)


def refusal(failure: Failure) -> ServiceError:
    """The refusal a :class:`Failure` carries, as the exception to raise."""
    return ServiceError(failure.status, failure.code, failure.message,
                        details=failure.details, retry_after=failure.retry_after)


class Principal(Message, tag="common.principal", kw_only=True):
    """Who makes a request, as the gateway authenticated it at the edge.

    ``auth_type`` is ``session`` (cookie), ``api_key`` or ``host``. A session
    principal carries its ``session_id``; an API key principal its
    ``api_key_id`` and the key's team. ``role`` is the user's role in
    ``team_id`` (``owner``, ``admin`` or ``member``).
    """

    auth_type: str
    user_id: str = ""
    team_id: str = ""
    role: str = ""
    is_admin: bool = False
    email: str = ""
    name: str = ""
    session_id: str = ""
    api_key_id: str = ""
    api_key_name: str = ""
    host_id: str = ""


class ClientInfo(Message, tag="common.client_info", kw_only=True):
    """The HTTP client behind a request (for sessions, rate limits, audit)."""

    ip: str = ""
    user_agent: str = ""


FAMILY = Family("common", __name__)
"""The common messages and their one Decoder (define every message above this line)."""
