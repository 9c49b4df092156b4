"""``codex-oauth``: a team's model credentials from an OAuth authorization-code flow with PKCE.

The flow (RFC 6749 §4.1 with RFC 7636 S256), per team:

1. ``login``: a one-time ``state`` and a PKCE verifier (sealed, 10 minutes)
   are stored; the answer is the issuer's authorization URL
   (``DOVECOTE_CODEX_ISSUER`` + ``DOVECOTE_CODEX_AUTHORIZE_PATH``) with
   ``client_id``, ``redirect_uri``, ``scope``, ``state``, ``code_challenge``.
2. ``callback``: the issuer redirected the browser with ``code`` and
   ``state``; the state is taken (once), the code exchanged at the token
   endpoint with the verifier, and the tokens stored sealed at rest.
3. ``access_token``: the planner's bearer; refreshed (``grant_type=
   refresh_token``) when it expires within :data:`REFRESH_MARGIN_S`, one
   refresh at a time per team, the new tokens sealed again.
4. ``logout`` deletes them. ``status`` tells configured / signed in / expiry,
   never a token.

Sealing reuses the notifier's :class:`~dovecote.notifier.channels.Sealer`
(pynacl SecretBox, bound to a subject id, here ``codex:<team>``) with its own
key: ``DOVECOTE_CODEX_KEY`` (base64 of 32 bytes) or ``<data dir>/codex.key``
(created once, 0600). Tokens are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import trio

from dovecote.bus.messages import codex as c
from dovecote.libs import keyfile
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.planner import PlannerError
from dovecote.notifier.channels import ConfigUnreadable, Sealer

log = get_logger("dovecote.runs.codex")

LOGIN_TTL_S = 600
REFRESH_MARGIN_S = 60.0
KEY_FILE = "codex.key"
HTTP_TIMEOUT_S = 15.0


@dataclass(frozen=True, kw_only=True)
class CodexSettings:
    issuer: str = ""
    client_id: str = "dovecote"
    scopes: str = "openid profile email offline_access"
    authorize_path: str = "/oauth/authorize"
    token_path: str = "/oauth/token"
    redirect_uri: str = ""
    """A fixed callback URL; empty: the gateway's own ``/api/auth/codex/callback``."""

    @property
    def configured(self) -> bool:
        return bool(self.issuer)


def load_key(key_b64: str, data_dir: str) -> bytes:
    """The key sealing codex tokens: ``DOVECOTE_CODEX_KEY``, else ``<data_dir>/codex.key``."""
    return keyfile.secret_key(key_b64, Path(data_dir) / KEY_FILE, variable="DOVECOTE_CODEX_KEY",
                              what="the codex key file")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def challenge_of(verifier: str) -> str:
    """The S256 code challenge of a PKCE verifier (RFC 7636 §4.2)."""
    return _b64url(hashlib.sha256(verifier.encode()).digest())


def wire(status: int, message: str, code: str = "invalid_request") -> ServiceError:
    return ServiceError(status, code, message, details={"wire": {"error": message}})


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z") if at else None


class CodexAuth:
    """See the module docstring."""

    def __init__(
        self, db: Database, settings: CodexSettings, key: bytes, client: httpx.AsyncClient | None = None
    ) -> None:
        self.db = db
        self.settings = settings
        self.sealer = Sealer(key)
        self._client = client
        self._locks: dict[str, trio.Lock] = {}

    def _endpoint(self, path: str) -> str:
        return self.settings.issuer.rstrip("/") + path

    def _require(self) -> None:
        if not self.settings.configured:
            raise wire(400, "codex-oauth is not configured on this host (DOVECOTE_CODEX_ISSUER)",
                       "codex_not_configured")

    # -- the flow -------------------------------------------------------------------------------

    async def login(self, team_id: str, redirect_uri: str) -> c.CodexLoginStarted:
        self._require()
        redirect = self.settings.redirect_uri or redirect_uri
        state = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(48)  # 64 characters of [A-Za-z0-9_-]
        expires = datetime.now(UTC) + timedelta(seconds=LOGIN_TTL_S)
        sealed = self.sealer.seal(f"codex-login:{state}", {"verifier": verifier, "team_id": team_id})
        await self.db.execute("DELETE FROM codex_logins WHERE expires_at < now()")
        await self.db.execute(
            "INSERT INTO codex_logins (state, team_id, sealed, redirect_uri, expires_at) "
            "VALUES (%s, %s, %s, %s, %s)",
            (state, team_id, sealed, redirect, expires),
        )
        query = urlencode({
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": redirect,
            "scope": self.settings.scopes,
            "state": state,
            "code_challenge": challenge_of(verifier),
            "code_challenge_method": "S256",
        })
        return c.CodexLoginStarted(
            url=f"{self._endpoint(self.settings.authorize_path)}?{query}",
            state=state,
            redirectUri=redirect,
            expiresAt=_iso(expires) or "",
        )

    async def callback(self, msg: c.CodexCallback) -> str:
        """Finish a sign-in; the team it was for."""
        self._require()
        if not msg.state or len(msg.state) > 256:
            raise wire(400, "Unknown or expired sign-in state.")
        row = await self.db.fetchone(
            "DELETE FROM codex_logins WHERE state = %s RETURNING team_id, sealed, redirect_uri, "
            "expires_at > now() AS fresh",
            (msg.state,),
        )
        if row is None or not row["fresh"]:
            raise wire(400, "Unknown or expired sign-in state.")
        if msg.error:
            raise wire(400, f"The issuer refused the sign-in: {msg.error[:100]}", "codex_refused")
        if not msg.code:
            raise wire(400, "code is required")
        try:
            inner = self.sealer.open(f"codex-login:{msg.state}", bytes(row["sealed"]), self.sealer.key_id)
        except ConfigUnreadable:
            raise wire(400, "Unknown or expired sign-in state.") from None
        tokens = await self._token_request({
            "grant_type": "authorization_code",
            "code": msg.code,
            "redirect_uri": row["redirect_uri"],
            "client_id": self.settings.client_id,
            "code_verifier": inner["verifier"],
        })
        team_id = str(row["team_id"])
        await self._store(team_id, tokens, previous_refresh=None)
        log.info("codex-oauth signed in", extra={"team_id": team_id})
        return team_id

    async def logout(self, team_id: str) -> None:
        await self.db.execute("DELETE FROM codex_credentials WHERE team_id = %s", (team_id,))

    async def status(self, team_id: str) -> c.ProviderStatus:
        if not self.settings.configured:
            return c.ProviderStatus(configured=False, signedIn=False,
                                    reason="DOVECOTE_CODEX_ISSUER is not set")
        row = await self.db.fetchone(
            "SELECT sealed, key_id, expires_at FROM codex_credentials WHERE team_id = %s", (team_id,)
        )
        if row is None:
            return c.ProviderStatus(configured=True, signedIn=False, issuer=self.settings.issuer)
        try:
            tokens = self._open(team_id, row)
        except ConfigUnreadable as exc:
            return c.ProviderStatus(configured=True, signedIn=False, issuer=self.settings.issuer,
                                    reason=f"stored credentials do not open: {exc}")
        return c.ProviderStatus(
            configured=True, signedIn=True, issuer=self.settings.issuer,
            expiresAt=_iso(row["expires_at"]), canRefresh=bool(tokens.get("refresh_token")),
        )

    async def signed_in(self, team_id: str) -> bool:
        return (await self.status(team_id)).signedIn

    async def access_token(self, team_id: str) -> str:
        """The team's access token, refreshed first when it expires within :data:`REFRESH_MARGIN_S`.

        Raises:
            PlannerError: not signed in, or the refresh failed (the planner reports it).
        """
        lock = self._locks.setdefault(team_id, trio.Lock())
        async with lock:
            row = await self.db.fetchone(
                "SELECT sealed, key_id, expires_at FROM codex_credentials WHERE team_id = %s", (team_id,)
            )
            if row is None:
                raise PlannerError("codex-oauth is not signed in (POST /api/auth/codex/login)",
                                   "planner_unavailable")
            try:
                tokens = self._open(team_id, row)
            except ConfigUnreadable as exc:
                raise PlannerError(f"the stored codex-oauth credentials do not open: {exc}") from None
            expires = float(tokens.get("expires_at") or 0)
            if expires and expires - REFRESH_MARGIN_S > time.time():
                return tokens["access_token"]
            refresh = tokens.get("refresh_token")
            if not refresh:
                raise PlannerError("the codex-oauth access token expired and there is no refresh token",
                                   "planner_unavailable")
            try:
                fresh = await self._token_request({
                    "grant_type": "refresh_token",
                    "refresh_token": refresh,
                    "client_id": self.settings.client_id,
                })
            except ServiceError as exc:
                raise PlannerError(f"codex-oauth refresh failed: {exc}") from None
            await self._store(team_id, fresh, previous_refresh=refresh)
            log.info("codex-oauth access token refreshed", extra={"team_id": team_id})
            return str(fresh["access_token"])

    # -- helpers ----------------------------------------------------------------------------------

    def _open(self, team_id: str, row: dict[str, Any]) -> dict[str, str]:
        return self.sealer.open(f"codex:{team_id}", bytes(row["sealed"]), str(row["key_id"]))

    async def _store(self, team_id: str, tokens: dict[str, Any], *, previous_refresh: str | None) -> None:
        expires_in = tokens.get("expires_in")
        expires_at = time.time() + float(expires_in) if isinstance(expires_in, int | float) else 0.0
        plain = {
            "access_token": str(tokens["access_token"]),
            "refresh_token": str(tokens.get("refresh_token") or previous_refresh or ""),
            "expires_at": repr(expires_at),
            "scope": str(tokens.get("scope") or self.settings.scopes),
        }
        sealed = self.sealer.seal(f"codex:{team_id}", plain)
        await self.db.execute(
            "INSERT INTO codex_credentials (team_id, sealed, key_id, expires_at, updated_at) "
            "VALUES (%s, %s, %s, %s, now()) ON CONFLICT (team_id) DO UPDATE SET sealed = EXCLUDED.sealed, "
            "key_id = EXCLUDED.key_id, expires_at = EXCLUDED.expires_at, updated_at = now()",
            (team_id, sealed, self.sealer.key_id,
             datetime.fromtimestamp(expires_at, UTC) if expires_at else None),
        )

    async def _token_request(self, form: dict[str, str]) -> dict[str, Any]:
        url = self._endpoint(self.settings.token_path)
        try:
            if self._client is not None:
                response = await self._client.post(url, data=form, headers={"Accept": "application/json"})
            else:
                async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
                    response = await client.post(url, data=form, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise wire(502, f"the codex issuer is unreachable: {type(exc).__name__}",
                       "codex_issuer") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 300 or not isinstance(body, dict) or not body.get("access_token"):
            reason = str(body.get("error", response.status_code)) if isinstance(body, dict) else "?"
            raise wire(502, f"the codex issuer refused the token request: {reason[:100]}", "codex_issuer")
        return body
