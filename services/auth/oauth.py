"""Sign-in with an OAuth provider (GitHub), and linking one to an account.

The flow, with the gateway as a stateless relay:

1. ``GET /auth/oauth/github`` → :meth:`OAuth.start` makes a random ``state``
   and the provider's authorization URL; the gateway puts the state in a
   short-lived ``SameSite=Lax`` cookie (Lax, so it survives the provider's
   top-level redirect back) and redirects the browser.
2. The provider redirects to ``{public_url}/auth/oauth/github/callback`` with
   ``code`` and ``state``; :meth:`OAuth.callback` compares the state with the
   cookie in constant time, exchanges the code (POST to the token URL), reads
   ``/user`` and ``/user/emails``, then signs the user in: an existing
   identity logs its account in; an unknown identity whose verified primary
   email belongs to a live account is refused (``email_taken``: whoever owns
   that account links GitHub from its settings); otherwise a new active
   account (no password) with a default team is created.
3. Every outcome is a redirect to the SPA, ``{oauth_redirect_url}/auth/github/
   callback`` with ``?error=<code>`` on failure; a sign-in also sets the
   session cookies. No token ever appears in a URL.

Linking (``GET /v1/me/providers/github/connect``) starts the same flow for a
signed-in user. The session cookie is ``SameSite=Strict``, so the browser
does not send it on the provider's redirect back; instead auth hands out a
*link token*, kept by the gateway in a second Lax cookie: the user and
session ids, an expiry and an HMAC over them and the flow's state. Its key is
derived from the provider's client secret, which only auth knows, so the
gateway and the browser can carry it but not forge it, and it is good for one
flow only (it is bound to that flow's state). The callback also checks that
the session is still live, so a logout in between cancels the link.

The provider's HTTP calls are blocking ``urllib`` requests with timeouts, in
worker threads. The client secret, the code and the access token are never
logged: failures are logged by provider, step and HTTP status only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import trio

from dovecote.bus.messages import auth as m
from dovecote.bus.messages import auth_oauth as o
from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.services.auth import audit, crypto, sessions
from dovecote.services.auth.access import require_session
from dovecote.services.auth.accounts import create_team
from dovecote.services.auth.context import AuthConfig, AuthContext

log = get_logger("dovecote.auth.oauth")

KNOWN_PROVIDERS = ("github",)
NOT_CONFIGURED = ServiceError(404, "not_found", "provider not found or not configured")
MAX_RESPONSE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Provider:
    """One configured OAuth provider."""

    name: str
    client_id: str
    client_secret: str
    authorize_url: str
    token_url: str
    api_url: str
    scope: str

    def link_key(self) -> bytes:
        """The HMAC key of this provider's link tokens (derived from its secret)."""
        return hmac.new(self.client_secret.encode(), b"dovecote/oauth-link/" + self.name.encode(),
                        hashlib.sha256).digest()


def configured_providers(config: AuthConfig) -> dict[str, Provider]:
    """The providers whose client id and secret are set."""
    out: dict[str, Provider] = {}
    if config.github_client_id and config.github_client_secret:
        out["github"] = Provider(
            name="github", client_id=config.github_client_id,
            client_secret=config.github_client_secret,
            authorize_url=config.github_authorize_url, token_url=config.github_token_url,
            api_url=config.github_api_url.rstrip("/"), scope="read:user user:email")
    return out


@dataclass(frozen=True)
class Profile:
    """Who the provider says the user is."""

    provider_user_id: str
    login: str
    name: str
    email: str  # the verified primary address, lower-cased; "" if there is none


@dataclass(frozen=True)
class LinkRequest:
    """A verified link token: link the identity to this user, via this session."""

    user_id: str
    session_id: str


class ExchangeFailed(Exception):
    """The provider refused the code or could not be reached (no secrets in the text)."""


class Refused(Exception):
    """The callback ends with this ``?error=`` code; the transaction rolls back."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# -- link tokens ---------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _link_mac(provider: Provider, state: str, user_id: str, session_id: str, expires: int) -> str:
    payload = f"{state}\n{user_id}\n{session_id}\n{expires}".encode()
    return _b64(hmac.new(provider.link_key(), payload, hashlib.sha256).digest())


def sign_link(provider: Provider, state: str, user_id: str, session_id: str, ttl_s: int,
              now: float | None = None) -> str:
    """A link token for one flow (``state``) of one signed-in session."""
    expires = int((time.time() if now is None else now) + ttl_s)
    return f"{expires}.{user_id}.{session_id}.{_link_mac(provider, state, user_id, session_id, expires)}"


def verify_link(provider: Provider, state: str, token: str,
                now: float | None = None) -> LinkRequest | None:
    """The link a token authorizes for this state, or None if forged or expired."""
    parts = token.split(".")
    if len(parts) != 4 or not parts[0].isdigit():
        return None
    expires, user_id, session_id, mac = int(parts[0]), parts[1], parts[2], parts[3]
    expected = _link_mac(provider, state, user_id, session_id, expires)
    if not hmac.compare_digest(mac.encode(), expected.encode()):
        return None
    if expires < (time.time() if now is None else now):
        return None
    return LinkRequest(user_id=user_id, session_id=session_id)


# -- the provider's HTTP API (blocking: worker threads only) --------------------


def _http_json(request: urllib.request.Request, timeout: float, step: str) -> Any:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ExchangeFailed(f"{step}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ExchangeFailed(f"{step}: {type(reason).__name__}") from None
    if len(raw) > MAX_RESPONSE_BYTES:
        raise ExchangeFailed(f"{step}: response too large")
    try:
        return json.loads(raw)
    except ValueError:
        raise ExchangeFailed(f"{step}: not JSON") from None


def exchange_code(provider: Provider, code: str, redirect_uri: str, timeout: float) -> str:
    """Trade an authorization code for an access token."""
    form = urllib.parse.urlencode({
        "client_id": provider.client_id, "client_secret": provider.client_secret,
        "code": code, "redirect_uri": redirect_uri,
    }).encode()
    request = urllib.request.Request(
        provider.token_url, data=form, method="POST",
        headers={"Accept": "application/json", "User-Agent": "dovecote",
                 "Content-Type": "application/x-www-form-urlencoded"})
    body = _http_json(request, timeout, "token")
    token = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        # GitHub answers 200 with {"error": "bad_verification_code", ...}.
        error = body.get("error") if isinstance(body, dict) else None
        raise ExchangeFailed(f"token: {error if isinstance(error, str) else 'no access_token'}")
    return token


def fetch_github_profile(provider: Provider, token: str, timeout: float) -> Profile:
    """``/user`` and the verified primary address from ``/user/emails``."""

    def get(path: str) -> Any:
        return _http_json(urllib.request.Request(provider.api_url + path, headers={
            "Accept": "application/vnd.github+json", "Authorization": f"Bearer {token}",
            "User-Agent": "dovecote", "X-GitHub-Api-Version": "2022-11-28"}), timeout, path)

    user = get("/user")
    if not isinstance(user, dict) or not isinstance(user.get("id"), int | str) or user.get("id") == "":
        raise ExchangeFailed("/user: no id")
    emails = get("/user/emails")
    email = ""
    if isinstance(emails, list):
        for entry in emails:
            if (isinstance(entry, dict) and entry.get("primary") and entry.get("verified")
                    and isinstance(entry.get("email"), str)):
                email = entry["email"].strip().lower()
                break
    login = user.get("login") if isinstance(user.get("login"), str) else ""
    name = user.get("name") if isinstance(user.get("name"), str) else ""
    return Profile(provider_user_id=str(user["id"]), login=login or "", name=name or "",
                   email=email)


def sign_in_identity(provider: Provider, code: str, redirect_uri: str, timeout: float) -> Profile:
    """The whole provider conversation of a callback (one worker thread)."""
    token = exchange_code(provider, code, redirect_uri, timeout)
    return fetch_github_profile(provider, token, timeout)


# -- the handlers ----------------------------------------------------------------


def _display_name(profile: Profile) -> str:
    name = " ".join((profile.name or profile.login or profile.email.split("@")[0]).split())
    name = "".join(c for c in name if c.isprintable())[:100]
    return name or "GitHub user"


def _actor(user_id: str, user: dict[str, Any]) -> tuple[str, str, str]:
    return ("user", user_id, user["name"] or user["email"])


class OAuth:
    """The handlers of OAuth sign-in, linking and unlinking."""

    def __init__(self, ctx: AuthContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.providers = configured_providers(ctx.config)
        self._http = trio.CapacityLimiter(4)

    def _provider(self, name: str) -> Provider:
        provider = self.providers.get(name)
        if provider is None:
            raise NOT_CONFIGURED
        return provider

    def callback_url(self, provider: Provider) -> str:
        """The ``redirect_uri`` registered with the provider."""
        return f"{self.config.public_url.rstrip('/')}/auth/oauth/{provider.name}/callback"

    def spa_url(self, provider: Provider, error: str = "") -> str:
        """Where the browser lands after the callback."""
        base = (self.config.oauth_redirect_url or self.config.public_url).rstrip("/")
        url = f"{base}/auth/{provider.name}/callback"
        return f"{url}?{urllib.parse.urlencode({'error': error})}" if error else url

    # -- start ---------------------------------------------------------------

    async def start(self, msg: o.OAuthStart) -> o.OAuthStarted:
        provider = self._provider(msg.provider)
        ttl = self.config.oauth_state_ttl_s
        state = crypto.new_token()
        link_token = ""
        if msg.link_actor is not None:
            require_session(msg.link_actor)
            link_token = sign_link(provider, state, msg.link_actor.user_id,
                                   msg.link_actor.session_id, ttl)
        query = urllib.parse.urlencode({
            "client_id": provider.client_id, "redirect_uri": self.callback_url(provider),
            "scope": provider.scope, "state": state,
        })
        sep = "&" if "?" in provider.authorize_url else "?"
        return o.OAuthStarted(auth_url=f"{provider.authorize_url}{sep}{query}", state=state,
                              link_token=link_token, max_age_s=ttl)

    # -- callback --------------------------------------------------------------

    async def callback(self, msg: o.OAuthCallback) -> o.OAuthFinished:
        provider = self._provider(msg.provider)

        def fail(code: str) -> o.OAuthFinished:
            log.info("oauth callback refused", extra={"provider": provider.name, "error": code})
            return o.OAuthFinished(redirect_url=self.spa_url(provider, code), error=code)

        if msg.error:
            return fail("access_denied")
        if not msg.state or not msg.state_cookie or not crypto.same(
                msg.state.encode(), msg.state_cookie.encode()):
            return fail("invalid_state")
        link: LinkRequest | None = None
        if msg.link_cookie:
            link = verify_link(provider, msg.state_cookie, msg.link_cookie)
            if link is None:
                return fail("invalid_state")
        if not msg.code:
            return fail("missing_code")
        try:
            profile = await trio.to_thread.run_sync(
                sign_in_identity, provider, msg.code, self.callback_url(provider),
                self.config.oauth_http_timeout_s, limiter=self._http)
        except ExchangeFailed as exc:
            log.warning("oauth exchange failed", extra={"provider": provider.name,
                                                        "reason": str(exc)})
            return fail("exchange_failed")
        try:
            if link is not None:
                await self.ctx.db.transaction(lambda conn: self._link(conn, provider, profile, link))
                return o.OAuthFinished(redirect_url=self.spa_url(provider))
            issued = await self.ctx.db.transaction(
                lambda conn: self._sign_in(conn, provider, profile, msg))
        except Refused as exc:
            return fail(exc.code)
        except Exception:
            log.exception("oauth sign-in failed", extra={"provider": provider.name})
            return fail("internal_error")
        return o.OAuthFinished(redirect_url=self.spa_url(provider), session=issued)

    def _identity_owner(self, conn: Connection, provider: Provider,
                        profile: Profile) -> dict[str, Any] | None:
        """The live account holding this identity; a deleted account's identity is released."""
        row = conn.execute(
            "SELECT u.id, u.email, u.name, u.is_active, u.is_admin, u.deleted_at "
            "FROM oauth_identities i JOIN users u ON u.id = i.user_id "
            "WHERE i.provider = %s AND i.provider_user_id = %s FOR UPDATE OF i",
            (provider.name, profile.provider_user_id)).fetchone()
        if row is not None and row["deleted_at"] is not None:
            conn.execute("DELETE FROM oauth_identities WHERE provider = %s AND provider_user_id = %s",
                         (provider.name, profile.provider_user_id))
            return None
        return dict(row) if row else None

    def _sign_in(self, conn: Connection, provider: Provider, profile: Profile,
                 msg: o.OAuthCallback) -> m.SessionIssued:
        user = self._identity_owner(conn, provider, profile)
        created = user is None
        if user is not None:
            if not user["is_active"]:
                raise Refused("access_denied")
            conn.execute("UPDATE oauth_identities SET login = %s WHERE provider = %s "
                         "AND provider_user_id = %s",
                         (profile.login, provider.name, profile.provider_user_id))
        else:
            if not profile.email:
                raise Refused("exchange_failed")  # no verified address to open an account with
            taken = conn.execute("SELECT 1 FROM users WHERE lower(email) = %s "
                                 "AND deleted_at IS NULL", (profile.email,)).fetchone()
            if taken is not None:
                raise Refused("email_taken")
            user_id = crypto.new_id("usr")
            first = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM users) AS first").fetchone()
            row = conn.execute(
                "INSERT INTO users (id, email, name, password_hash, is_active, is_admin) "
                "VALUES (%s, %s, %s, NULL, true, %s) RETURNING id, email, name, is_admin",
                (user_id, profile.email, _display_name(profile),
                 bool(first and first["first"]))).fetchone()
            assert row is not None
            user = dict(row)
            conn.execute(
                "INSERT INTO oauth_identities (provider, provider_user_id, user_id, email, login) "
                "VALUES (%s, %s, %s, %s, %s)",
                (provider.name, profile.provider_user_id, user_id, profile.email, profile.login))
        team_id = sessions.default_team(conn, user["id"])
        if team_id is None:
            team_id = create_team(conn, owner_id=user["id"], name=f"{user['name']}'s team",
                                  is_default=True)
        issued = sessions.issue(conn, user=user, team_id=team_id, client=msg.client,
                                absolute_s=self.config.session_absolute_s)
        if created:
            audit.write(conn, actor=None, action="signup", resource_type="user",
                        resource_id=user["id"], team_id=team_id, scope="user",
                        actor_override=_actor(user["id"], user),
                        metadata={"provider": provider.name})
        audit.write(conn, actor=None, action="login", resource_type="session",
                    resource_id=user["id"], team_id=team_id, scope="user",
                    actor_override=_actor(user["id"], user), metadata={"provider": provider.name})
        return issued

    def _link(self, conn: Connection, provider: Provider, profile: Profile,
              link: LinkRequest) -> None:
        user = conn.execute(
            "SELECT u.id, u.email, u.name, s.team_id FROM sessions s JOIN users u ON u.id = s.user_id "
            "WHERE s.id = %s AND s.user_id = %s AND s.revoked_at IS NULL AND s.expires_at > now() "
            "AND u.is_active AND u.deleted_at IS NULL FOR UPDATE OF u",
            (link.session_id, link.user_id)).fetchone()
        if user is None:  # signed out (or deleted) since the flow began
            raise Refused("invalid_state")
        owner = self._identity_owner(conn, provider, profile)
        if owner is not None and owner["id"] != link.user_id:
            raise Refused("email_taken")  # this GitHub account signs in to another account
        if owner is not None:
            return  # already linked to this account
        replaced = conn.execute(
            "DELETE FROM oauth_identities WHERE user_id = %s AND provider = %s "
            "RETURNING provider_user_id", (link.user_id, provider.name)).fetchone()
        conn.execute(
            "INSERT INTO oauth_identities (provider, provider_user_id, user_id, email, login) "
            "VALUES (%s, %s, %s, %s, %s)",
            (provider.name, profile.provider_user_id, link.user_id, profile.email, profile.login))
        metadata: dict[str, Any] = {"provider": provider.name, "login": profile.login}
        if replaced is not None:
            metadata["replaced"] = True
        audit.write(conn, actor=None, action="link", resource_type="user",
                    resource_id=link.user_id, team_id=user["team_id"], scope="user",
                    actor_override=_actor(link.user_id, dict(user)), metadata=metadata)

    # -- unlink ----------------------------------------------------------------

    async def disconnect(self, msg: o.DisconnectProvider) -> m.Done:
        require_session(msg.actor)
        if msg.provider not in KNOWN_PROVIDERS:
            raise NOT_CONFIGURED
        user_id = msg.actor.user_id

        def work(conn: Connection) -> None:
            # The user row lock serializes two unlinks racing to leave no login method.
            user = conn.execute("SELECT password_hash FROM users WHERE id = %s "
                                "AND deleted_at IS NULL FOR UPDATE", (user_id,)).fetchone()
            if user is None:
                raise sessions.UNAUTHORIZED
            identity = conn.execute("SELECT login FROM oauth_identities WHERE user_id = %s "
                                    "AND provider = %s", (user_id, msg.provider)).fetchone()
            if identity is None:
                raise ServiceError(404, "not_found", "provider not connected")
            others = conn.execute("SELECT count(*) AS n FROM oauth_identities WHERE user_id = %s "
                                  "AND provider <> %s", (user_id, msg.provider)).fetchone()
            if user["password_hash"] is None and not (others and others["n"]):
                raise ServiceError(400, "last_login_method",
                                   "cannot disconnect your only login method; set a password first")
            conn.execute("DELETE FROM oauth_identities WHERE user_id = %s AND provider = %s",
                         (user_id, msg.provider))
            audit.write(conn, actor=msg.actor, action="unlink", resource_type="user",
                        resource_id=user_id, team_id=msg.actor.team_id, scope="user",
                        metadata={"provider": msg.provider, "login": identity["login"]})

        await self.ctx.db.transaction(work)
        return m.Done()

    def register(self, handle: Any) -> None:
        """Register every handler with the service's dispatcher."""
        handle(o.OAuthStart, self.start)
        handle(o.OAuthCallback, self.callback)
        handle(o.DisconnectProvider, self.disconnect)
