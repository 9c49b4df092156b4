"""Model sign-in: ``/api/auth/status`` and ``/api/auth/codex/{login,callback,logout}``
(the agent runs reference, tag ``runs-auth``).

``login`` (your team, ``X-API-Key`` or a session) answers the issuer's
authorization URL to open; the issuer sends the browser back to
``/api/auth/codex/callback?code&state`` (no credentials: the one-time
``state`` names the team), which finishes the sign-in in the runs service.
The callback URL is ``DOVECOTE_PUBLIC_URL`` (else this request's origin) +
``/api/auth/codex/callback``, unless the runs service has one configured.
No answer carries a token.
"""

from __future__ import annotations

from typing import Any

import msgspec
from quart import Response, request

from dovecote.bus.messages import codex as c
from dovecote.gateway.calls import json_response
from dovecote.gateway.errors import Error, api_error
from dovecote.gateway.openapi import AnyOf
from dovecote.gateway.routes.desktops import ErrorMessage, WireError, wired
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import DovecoteError, ServiceError

TAGS = ["runs-auth"]
CALLBACK = "/api/auth/codex/callback"


class CallbackQuery(msgspec.Struct, kw_only=True):
    state: str = ""
    code: str | None = None
    error: str | None = None
    error_description: str | None = None


class CallbackDone(msgspec.Struct, kw_only=True):
    provider: str
    signedIn: bool
    expiresAt: str | None


async def ask(state: GatewayState, message: Any, timeout_s: float = 15.0) -> Any:
    """The runs service's reply; a refusal with a reference body (``details["wire"]``) is sent as is."""
    try:
        return await state.bus.request("runs", message, timeout=timeout_s)
    except ServiceError as exc:
        wire = (exc.details or {}).get("wire")
        if wire is not None:
            raise WireError(exc.status, wire) from None
        raise api_error(exc, "runs") from None
    except DovecoteError as exc:
        raise api_error(exc, "runs") from None


def _callback_url(state: GatewayState) -> str:
    base = state.config.public_url.rstrip("/") or request.host_url.rstrip("/")
    return base + CALLBACK


def register(state: GatewayState) -> None:
    """Add the model sign-in routes."""
    api, app, edge = state.api, state.app, state.edge

    @api.route(app, "GET", "/api/auth/status", summary="Each model provider's sign-in state (no secrets)",
               tags=TAGS, responses={200: c.AuthStatus})
    @wired
    async def auth_status() -> Response:
        actor = await edge.authenticate()
        reply: c.AuthStatusReply = await ask(state, c.GetAuthStatus(actor=actor))
        return json_response(reply.status)

    @api.route(app, "POST", "/api/auth/codex/login", summary="Start the codex-oauth sign-in (PKCE)",
               tags=TAGS, responses={200: c.CodexLoginStarted, 400: AnyOf(ErrorMessage, Error)},
               descriptions={400: "codex-oauth is not configured on this host"})
    @wired
    async def codex_login() -> Response:
        actor = await edge.authenticate()
        reply: c.CodexLoginReply = await ask(
            state, c.CodexLogin(actor=actor, redirect_uri=_callback_url(state)))
        return json_response(reply.login)

    @api.route(app, "GET", CALLBACK, summary="The issuer's redirect: finish the codex-oauth sign-in",
               tags=TAGS, security=False, query=CallbackQuery,
               responses={200: CallbackDone, 400: ErrorMessage, 502: ErrorMessage},
               descriptions={400: "an unknown, used or expired state; the issuer refused",
                             502: "the token exchange failed"})
    @wired
    async def codex_callback() -> Response:
        args = request.args
        message = c.CodexCallback(
            state=args.get("state", "")[:512], code=args.get("code"), error=args.get("error"),
            error_description=args.get("error_description"))
        reply: c.AuthStatusReply = await ask(state, message, 30.0)
        codex = reply.status.providers["codex-oauth"]
        return json_response(CallbackDone(provider="codex-oauth", signedIn=codex.signedIn,
                                          expiresAt=codex.expiresAt))

    @api.route(app, "POST", "/api/auth/codex/logout", summary="Clear your team's codex-oauth tokens",
               tags=TAGS, responses={200: c.AuthStatus})
    @wired
    async def codex_logout() -> Response:
        actor = await edge.authenticate()
        reply: c.AuthStatusReply = await ask(state, c.CodexLogout(actor=actor))
        return json_response(reply.status)
