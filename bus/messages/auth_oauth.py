"""Messages of the auth service for OAuth sign-in and linked providers.

The gateway keeps no OAuth settings and no state: auth builds the provider's
authorization URL and the random ``state`` (:class:`OAuthStart`), the gateway
puts the state (and, for a link, auth's signed link token) in short-lived
cookies, and on the provider's redirect back hands the query and those cookies
to auth (:class:`OAuthCallback`). Auth answers with where to send the browser
and, on a sign-in, the new session whose cookies the gateway sets.
"""

from __future__ import annotations

import msgspec

from .auth import Done, SessionIssued
from .base import Family, Message, Request
from .common import ClientInfo, Principal


class OAuthStart(Request["OAuthStarted"], tag="auth.oauth_start", kw_only=True):
    """Begin a sign-in (``link_actor`` None) or a link to the caller's account."""

    provider: str
    link_actor: Principal | None = None


class OAuthStarted(Message, tag="auth.oauth_started", kw_only=True):
    """Where to send the browser, and the cookie values that must come back.

    ``link_token`` is empty for a sign-in; both cookies live ``max_age_s``.
    """

    auth_url: str
    state: str
    link_token: str = ""
    max_age_s: int = 600


class OAuthCallback(Request["OAuthFinished"], tag="auth.oauth_callback", kw_only=True):
    """The provider's redirect back: its query parameters and our cookies."""

    provider: str
    code: str = ""
    state: str = ""
    error: str = ""
    state_cookie: str = ""
    link_cookie: str = ""
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class OAuthFinished(Message, tag="auth.oauth_finished", kw_only=True):
    """The SPA URL to redirect to (with ``?error=`` on failure) and, after a
    sign-in, the session to set."""

    redirect_url: str
    error: str = ""
    session: SessionIssued | None = None


class DisconnectProvider(Request[Done], tag="auth.disconnect_provider", kw_only=True):
    """Unlink ``provider`` from the caller's account."""

    actor: Principal
    provider: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


FAMILY = Family("auth_oauth", __name__)
"""The auth_oauth messages and their one Decoder (define every message above this line)."""
