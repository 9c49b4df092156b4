"""Messages every domain shares: a refused request, the caller, the client."""

from __future__ import annotations

from .base import Message


class Failure(Message, tag="common.failure", kw_only=True):
    """A service refused a request on purpose; the gateway answers with it.

    ``status`` is the HTTP status, ``code`` the stable error code and
    ``retry_after`` (seconds) accompanies 429.
    """

    status: int
    code: str
    message: str
    retry_after: int | None = None


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
