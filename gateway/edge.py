"""Authentication at the edge.

Every request that needs a caller goes through :meth:`Edge.authenticate`:

* ``X-API-Key: wrn_...`` → the key's team and creator (no CSRF: keys are not
  sent by browsers on their own);
* the ``wrenn_sid`` cookie → the session's user and active team; on any
  method but GET/HEAD/OPTIONS the ``X-CSRF-Token`` header must equal the
  ``wrenn_csrf`` cookie *and* hash to the session's CSRF hash (double submit,
  bound to the session).

Auth answers are cached for a few seconds, keyed by the credential's hash,
so a burst of requests costs one bus round trip. Auth publishes
``auth.invalidate`` on logout, revocation, role and admin changes; the
gateway drops matching entries at once (:meth:`Edge.serve_invalidations`),
so the cache never outlives a revoked credential by more than a bus hop.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import trio
from quart import Response, request

from dovecote.bus.messages.auth import AuthInvalidated, ResolveApiKey, Resolved, ResolveSession
from dovecote.bus.messages.common import Principal
from dovecote.bus.messages.hosts import ResolveHostToken
from dovecote.gateway.calls import call
from dovecote.gateway.errors import ApiError
from dovecote.gateway.state import GatewayState
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.gateway.edge")

SESSION_COOKIE = "wrenn_sid"
CSRF_COOKIE = "wrenn_csrf"
CSRF_HEADER = "X-CSRF-Token"
API_KEY_HEADER = "X-API-Key"
HOST_TOKEN_HEADER = "X-Host-Token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class Edge:
    """Resolves credentials to principals, with a short invalidated cache."""

    def __init__(self, state: GatewayState, ttl_s: float = 10.0, max_entries: int = 10_000) -> None:
        self.state = state
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[bytes, tuple[float, Resolved]] = {}

    async def platform_admin(self) -> Principal:
        """The caller, a platform admin with a session, or 401/403 (the ``/v1/admin/*`` routes)."""
        actor = await self.authenticate(session_only=True)
        if not actor.is_admin:
            raise ApiError(403, "forbidden", "platform admin access required")
        return actor

    async def authenticate(self, *, session_only: bool = False,
                           allow_api_key: bool = True) -> Principal:
        """The caller of the current request, or 401/403."""
        key = request.headers.get(API_KEY_HEADER)
        if key and allow_api_key and not session_only:
            return await self.resolve_api_key(key)
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid:
            if key:
                # A valid key on a session-only route is 403; a bad one 401.
                await self.resolve_api_key(key)
                raise ApiError(403, "session_required", "this operation requires a signed-in session")
            raise ApiError(401, "unauthorized", "authentication required")
        resolved = await self.resolve_session(sid)
        if request.method not in SAFE_METHODS:
            header = request.headers.get(CSRF_HEADER, "")
            cookie = request.cookies.get(CSRF_COOKIE, "")
            if not header or not hmac.compare_digest(header, cookie) or not hmac.compare_digest(
                    _digest(header), resolved.csrf_hash):
                raise ApiError(403, "csrf_failed",
                               "missing or mismatched X-CSRF-Token (it must equal the wrenn_csrf cookie)")
        return resolved.principal

    async def resolve_api_key(self, key: str) -> Principal:
        """The principal of an ``X-API-Key`` value (cached), or 401."""
        return (await self._resolve(b"k" + _digest(key), ResolveApiKey(key=key))).principal

    async def resolve_session(self, sid: str) -> Resolved:
        """The session behind a ``wrenn_sid`` value (cached), or 401; CSRF is the caller's."""
        return await self._resolve(b"s" + _digest(sid), ResolveSession(sid=sid))

    async def authenticate_host(self) -> Principal:
        """The host of the current request's ``X-Host-Token`` JWT, or 401.

        Auth checks the signature, expiry, the host and its token chain; the
        answer is cached for at most a few seconds (auth sets the TTL).
        """
        token = request.headers.get(HOST_TOKEN_HEADER, "")
        if not token or len(token) > 4096:
            raise ApiError(401, "unauthorized", "a valid X-Host-Token is required")
        resolved = await self._resolve(b"h" + _digest(token), ResolveHostToken(token=token))
        return resolved.principal

    async def _resolve(self, cache_key: bytes,
                       message: ResolveSession | ResolveApiKey | ResolveHostToken) -> Resolved:
        now = time.monotonic()
        hit = self._cache.get(cache_key)
        if hit and hit[0] > now:
            return hit[1]
        resolved: Resolved = await call(self.state, "auth", message)
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        ttl = self.ttl_s if not resolved.expires_in_s else min(self.ttl_s, resolved.expires_in_s)
        self._cache[cache_key] = (now + ttl, resolved)
        return resolved

    def forget(self, event: AuthInvalidated) -> None:
        """Drop cached principals that ``event`` names."""
        sessions, users = set(event.session_ids), set(event.user_ids)
        keys, teams = set(event.api_key_ids), set(event.team_ids)
        for cache_key, (_, resolved) in list(self._cache.items()):
            p = resolved.principal
            if (p.session_id in sessions or p.user_id in users or p.api_key_id in keys
                    or p.team_id in teams):
                self._cache.pop(cache_key, None)

    async def serve_invalidations(self, *,
                                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply ``auth.invalidate`` events to the cache, forever."""
        async with self.state.bus.subscribe("auth.invalidate") as events:
            task_status.started()
            async for _topic, event in events:
                if isinstance(event, AuthInvalidated):
                    self.forget(event)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def set_session_cookies(response: Response, sid: str, csrf: str, max_age_s: int) -> None:
    """Set ``wrenn_sid`` (HttpOnly) and ``wrenn_csrf`` (readable by the SPA)."""
    secure = request.scheme == "https"
    response.set_cookie(SESSION_COOKIE, sid, max_age=max_age_s, path="/", httponly=True,
                        secure=secure, samesite="Strict")
    response.set_cookie(CSRF_COOKIE, csrf, max_age=max_age_s, path="/", httponly=False,
                        secure=secure, samesite="Strict")


def clear_session_cookies(response: Response) -> None:
    """Expire both session cookies."""
    secure = request.scheme == "https"
    for name, http_only in ((SESSION_COOKIE, True), (CSRF_COOKIE, False)):
        response.set_cookie(name, "", max_age=0, expires=0, path="/", httponly=http_only,
                            secure=secure, samesite="Strict")
