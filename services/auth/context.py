"""What the auth handlers share: config, database, mailer, bus and helpers."""

from __future__ import annotations

from typing import Annotated

import msgspec
import trio

from dovecote.bus.messages.auth import AuthInvalidated
from dovecote.libs.config import BaseConfig
from dovecote.libs.db import Database
from dovecote.libs.runtime import ServiceContext
from dovecote.services.auth import crypto
from dovecote.services.auth.mail import Mailer

INVALIDATE_TOPIC = "auth.invalidate"

Seconds = Annotated[int, msgspec.Meta(gt=0)]


class AuthConfig(BaseConfig, kw_only=True):
    """Settings of the auth service (``DOVECOTE_*`` variables, ``SMTP_URL``)."""

    __env__ = {"database_url": "DATABASE_URL", "smtp_url": "SMTP_URL"}

    public_url: str = "http://127.0.0.1:8080"
    smtp_url: str | None = None
    mail_from: str = "Dovecote <no-reply@dovecote.local>"
    session_idle_s: Seconds = 6 * 3600
    session_absolute_s: Seconds = 24 * 3600
    activation_ttl_s: Seconds = 30 * 60
    reset_ttl_s: Seconds = 15 * 60
    signup_cooldown_s: Annotated[int, msgspec.Meta(ge=0)] = 60
    signup_max_per_ip: Seconds = 20
    login_max_per_account: Seconds = 10
    login_max_per_ip: Seconds = 50
    login_window_s: Seconds = 15 * 60
    purge_days: Seconds = 15
    # OAuth (services/auth/oauth.py): GitHub is offered once both client
    # settings are set; the URLs are settings so tests can use a local server.
    github_client_id: str | None = None
    github_client_secret: str | None = None
    github_authorize_url: str = "https://github.com/login/oauth/authorize"
    github_token_url: str = "https://github.com/login/oauth/access_token"
    github_api_url: str = "https://api.github.com"
    oauth_redirect_url: str | None = None  # the SPA's base URL; public_url when unset
    oauth_state_ttl_s: Seconds = 10 * 60
    oauth_http_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 8.0
    # Account purge (services/auth/purge.py).
    purge_interval_s: Seconds = 3600


class AuthContext:
    """The auth service's shared state, built once at start."""

    def __init__(self, service: ServiceContext[AuthConfig]) -> None:
        assert service.db is not None, "auth owns tables: it always has a database"
        self.service = service
        self.config = service.config
        self.db: Database = service.db
        self.bus = service.bus
        self.mailer = Mailer(self.db, self.config.smtp_url, self.config.mail_from)
        # argon2id is CPU- and memory-heavy: a few at a time, off the event loop.
        self._hashing = trio.CapacityLimiter(2)

    async def hash_password(self, password: str) -> str:
        """argon2id hash, computed in a worker thread."""
        return await trio.to_thread.run_sync(crypto.hash_password, password,
                                             limiter=self._hashing)

    async def verify_password(self, stored: str | None, password: str) -> bool:
        """Constant-time verification in a worker thread."""
        return await trio.to_thread.run_sync(crypto.verify_password, stored, password,
                                             limiter=self._hashing)

    async def invalidate(self, *, session_ids: list[str] | None = None,
                         user_ids: list[str] | None = None, api_key_ids: list[str] | None = None,
                         team_ids: list[str] | None = None) -> None:
        """Tell every gateway to drop cached principals matching these ids."""
        await self.bus.publish(INVALIDATE_TOPIC, AuthInvalidated(
            session_ids=session_ids or [], user_ids=user_ids or [],
            api_key_ids=api_key_ids or [], team_ids=team_ids or []))
