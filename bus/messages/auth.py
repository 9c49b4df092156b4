"""Messages of the auth service (bus name ``auth``).

The gateway authenticates every request at the edge by asking auth
(:class:`ResolveSession`, :class:`ResolveApiKey`) and forwards each accounts
operation as one request message carrying the caller (:class:`Principal`) and
the HTTP client (:class:`ClientInfo`). Replies are the documented response
bodies (``*Reply``) or a :class:`~dovecote.bus.messages.common.Failure`.

Auth publishes :class:`AuthInvalidated` on ``auth.invalidate`` whenever a
cached principal may be stale (logout, revocation, role or admin change), so
gateways drop it at once instead of waiting for the cache to expire.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .base import Family, Message, Request
from .common import ClientInfo, Principal

# -- edge authentication ------------------------------------------------------


class ResolveSession(Request["Resolved"], tag="auth.resolve_session", kw_only=True):
    """Who holds this ``wrenn_sid`` cookie value? Refreshes the idle window."""

    sid: str


class ResolveApiKey(Request["Resolved"], tag="auth.resolve_api_key", kw_only=True):
    """Who holds this ``X-API-Key`` value? Records ``last_used``."""

    key: str


class Resolved(Message, tag="auth.resolved", kw_only=True):
    """A valid credential: its principal, and for sessions the CSRF hash."""

    principal: Principal
    csrf_hash: bytes = b""
    expires_in_s: int = 0


class AuthInvalidated(Message, tag="auth.invalidated", kw_only=True):
    """Event: cached principals matching any of these ids are stale."""

    session_ids: list[str] = []
    user_ids: list[str] = []
    api_key_ids: list[str] = []
    team_ids: list[str] = []


# -- sign-up, activation, login, sessions ------------------------------------


class Signup(Request["MessageReply"], tag="auth.signup", kw_only=True):
    email: str
    password: str
    name: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class MessageReply(Message, tag="auth.message_reply", kw_only=True):
    """A body of the form ``{"message": ...}``."""

    message: str


class Activate(Request["SessionIssued"], tag="auth.activate", kw_only=True):
    token: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class Login(Request["SessionIssued"], tag="auth.login", kw_only=True):
    email: str
    password: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class SessionResponse(msgspec.Struct, kw_only=True):
    """The reference's ``SessionResponse``."""

    user_id: str
    team_id: str
    email: str
    name: str
    role: str
    is_admin: bool


class SessionIssued(Message, tag="auth.session_issued", kw_only=True):
    """A new session: the body to return and the cookie values to set."""

    body: SessionResponse
    sid: str
    csrf: str
    max_age_s: int


class Logout(Request["Done"], tag="auth.logout", kw_only=True):
    actor: Principal
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class LogoutAll(Request["Done"], tag="auth.logout_all", kw_only=True):
    actor: Principal
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class Done(Message, tag="auth.done", kw_only=True):
    """An operation with no body (HTTP 204)."""


class ListSessions(Request["SessionsReply"], tag="auth.list_sessions", kw_only=True):
    actor: Principal


class SessionEntry(msgspec.Struct, kw_only=True):
    id: str
    user_agent: str
    ip_address: str
    created_at: str
    last_seen_at: str
    expires_at: str
    current: bool


class SessionsReply(Message, tag="auth.sessions_reply", kw_only=True):
    sessions: list[SessionEntry]


class RevokeSession(Request["Done"], tag="auth.revoke_session", kw_only=True):
    actor: Principal
    session_id: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class SwitchTeam(Request["SessionIssued"], tag="auth.switch_team", kw_only=True):
    actor: Principal
    team_id: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


# -- the caller's own account -------------------------------------------------


class GetMe(Request["MeReply"], tag="auth.get_me", kw_only=True):
    actor: Principal


class MeResponse(msgspec.Struct, kw_only=True):
    """The reference's ``MeResponse``."""

    name: str
    email: str
    has_password: bool
    providers: list[str]


class MeReply(Message, tag="auth.me_reply", kw_only=True):
    body: MeResponse


class UpdateMe(Request["Done"], tag="auth.update_me", kw_only=True):
    actor: Principal
    name: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class DeleteMe(Request["Done"], tag="auth.delete_me", kw_only=True):
    actor: Principal
    confirmation: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class ChangePassword(Request["Done"], tag="auth.change_password", kw_only=True):
    actor: Principal
    new_password: str
    current_password: str | None = None
    confirm_password: str | None = None
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class RequestPasswordReset(Request["Done"], tag="auth.request_password_reset", kw_only=True):
    email: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class ConfirmPasswordReset(Request["Done"], tag="auth.confirm_password_reset", kw_only=True):
    token: str
    new_password: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


# -- mail outbox (``dovecote outbox``) ----------------------------------------


class ListOutbox(Request["OutboxReply"], tag="auth.list_outbox", kw_only=True):
    limit: int = 20


class OutboxMail(msgspec.Struct, kw_only=True):
    id: int
    to: str
    subject: str
    body: str
    created_at: str


class OutboxReply(Message, tag="auth.outbox_reply", kw_only=True):
    mails: list[OutboxMail]


# -- generic JSON reply --------------------------------------------------------


class JsonReply(Message, tag="auth.json_reply", kw_only=True):
    """A documented response body that the gateway returns as is."""

    status: int = 200
    body: Any = None


FAMILY = Family("auth", __name__)
"""The auth messages and their one Decoder (define every message above this line)."""
