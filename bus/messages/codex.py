"""Messages of the runs service's model sign-in: ``/api/auth/status`` and ``/api/auth/codex/*``.

``codex-oauth`` is an OAuth 2.0 authorization-code flow with PKCE (S256)
against a configured issuer, per team: :class:`CodexLogin` answers the URL to
open (with a one-time ``state``), the issuer redirects the browser to the
gateway's callback, which sends :class:`CodexCallback`; the runs service
exchanges the code and keeps the tokens sealed at rest. No reply carries a
token: :class:`AuthStatus` says what is configured and signed in, and when the
access token expires.
"""

from __future__ import annotations

import msgspec

from .base import Family, Message, Request
from .common import Principal


class ProviderStatus(msgspec.Struct, kw_only=True):
    configured: bool
    """The provider can be used on this host (a model, or an issuer, is configured)."""
    signedIn: bool
    """Credentials are stored (``api-key``: the configured key; ``codex-oauth``: the team's tokens)."""
    expiresAt: str | None = None
    """When the stored access token expires (it is refreshed before use)."""
    canRefresh: bool = False
    issuer: str | None = None
    reason: str | None = None


class AuthStatus(msgspec.Struct, kw_only=True):
    providers: dict[str, ProviderStatus]


class CodexLoginStarted(msgspec.Struct, kw_only=True):
    url: str
    """The issuer's authorization URL to open in a browser."""
    state: str
    redirectUri: str
    expiresAt: str


class AuthStatusReply(Message, tag="codex.status_reply", kw_only=True):
    status: AuthStatus


class CodexLoginReply(Message, tag="codex.login_reply", kw_only=True):
    login: CodexLoginStarted


class GetAuthStatus(Request[AuthStatusReply], tag="codex.status_get", kw_only=True):
    idempotent = True
    actor: Principal


class CodexLogin(Request[CodexLoginReply], tag="codex.login", kw_only=True):
    actor: Principal
    redirect_uri: str
    """The gateway's callback URL (``/api/auth/codex/callback``), unless one is configured."""


class CodexCallback(Request[AuthStatusReply], tag="codex.callback", kw_only=True):
    """The issuer's redirect; ``state`` names the team (no credentials travel with it)."""

    state: str
    code: str | None = None
    error: str | None = None
    error_description: str | None = None


class CodexLogout(Request[AuthStatusReply], tag="codex.logout", kw_only=True):
    actor: Principal


FAMILY = Family("codex", __name__)
"""The sign-in messages and their one Decoder (define every message above this line)."""
