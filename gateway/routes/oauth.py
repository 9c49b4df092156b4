"""``/auth/oauth/{provider}`` and ``/v1/me/providers/*``: sign-in with GitHub,
and linking or unlinking it (capsules reference, tags auth/account).

The gateway holds no OAuth settings or state: auth makes the authorization
URL, the ``state`` and (for a link) a signed link token; the gateway keeps the
last two in short-lived HttpOnly cookies scoped to ``/auth/oauth/`` and hands
them back to auth on the callback, whose answer is always a redirect to the
SPA (with the session cookies after a sign-in). The cookies are
``SameSite=Lax``: ``Strict`` ones are not sent on the provider's redirect back.
"""

from __future__ import annotations

import msgspec
from quart import Response, request

from dovecote.bus.messages import auth_oauth as o
from dovecote.gateway.calls import client_info, json_response
from dovecote.gateway.edge import set_session_cookies
from dovecote.gateway.routing import Family, Route, register_routes
from dovecote.gateway.state import GatewayState

STATE_COOKIE = "wrenn_oauth_state"
LINK_COOKIE = "wrenn_oauth_link"
COOKIE_PATH = "/auth/oauth/"
MAX_PARAM = 2048


class ConnectProviderResponse(msgspec.Struct, kw_only=True):
    """The reference's answer to ``connectProvider``."""

    auth_url: str


def _redirect(url: str) -> Response:
    response = Response(b"", status=302, headers={"Location": url})
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _set_flow_cookie(response: Response, name: str, value: str, max_age_s: int) -> None:
    response.set_cookie(name, value, max_age=max_age_s, path=COOKIE_PATH, httponly=True,
                        secure=request.scheme == "https", samesite="Lax")


def _clear_flow_cookie(response: Response, name: str) -> None:
    response.set_cookie(name, "", max_age=0, expires=0, path=COOKIE_PATH, httponly=True,
                        secure=request.scheme == "https", samesite="Lax")


def _set_flow(response: Response, started: o.OAuthStarted) -> None:
    _set_flow_cookie(response, STATE_COOKIE, started.state, started.max_age_s)
    if started.link_token:
        _set_flow_cookie(response, LINK_COOKIE, started.link_token, started.max_age_s)
    else:  # a sign-in started after an abandoned link must not link
        _clear_flow_cookie(response, LINK_COOKIE)


def _param(name: str) -> str:
    return request.args.get(name, "")[:MAX_PARAM]


def _started(started: o.OAuthStarted) -> Response:
    response = _redirect(started.auth_url)
    _set_flow(response, started)
    return response


def _finished(finished: o.OAuthFinished) -> Response:
    response = _redirect(finished.redirect_url)
    _clear_flow_cookie(response, STATE_COOKIE)
    _clear_flow_cookie(response, LINK_COOKIE)
    if finished.session is not None:
        issued = finished.session
        set_session_cookies(response, issued.sid, issued.csrf, issued.max_age_s)
    return response


def _link_started(started: o.OAuthStarted) -> Response:
    response = json_response(ConnectProviderResponse(auth_url=started.auth_url))
    response.headers["Cache-Control"] = "no-store"
    _set_flow(response, started)
    return response


OAUTH = Family(tags=["auth"], service="auth", auth="session")

ROUTES = [
    Route(method="GET", path="/auth/oauth/{provider}", name="oauth_redirect",
          summary="Start OAuth login flow", auth="public", status=302,
          message=lambda ctx: o.OAuthStart(provider=ctx.params["provider"]), reply=_started),
    Route(method="GET", path="/auth/oauth/{provider}/callback", name="oauth_callback",
          summary="OAuth callback", auth="public", status=302, timeout_s=45.0,
          message=lambda ctx: o.OAuthCallback(
              provider=ctx.params["provider"], code=_param("code"), state=_param("state"),
              error=_param("error"), state_cookie=request.cookies.get(STATE_COOKIE, "")[:MAX_PARAM],
              link_cookie=request.cookies.get(LINK_COOKIE, "")[:MAX_PARAM], client=client_info()),
          reply=_finished),
    Route(method="GET", path="/v1/me/providers/{provider}/connect", name="connect_provider",
          summary="Initiate OAuth provider link", tags=["account"], response=ConnectProviderResponse,
          message=lambda ctx: o.OAuthStart(provider=ctx.params["provider"], link_actor=ctx.actor),
          reply=_link_started),
    Route(method="DELETE", path="/v1/me/providers/{provider}", name="disconnect_provider",
          summary="Disconnect an OAuth provider", tags=["account"], status=204,
          message=lambda ctx: o.DisconnectProvider(actor=ctx.actor, provider=ctx.params["provider"],
                                                   client=client_info())),
]


def register(state: GatewayState) -> None:
    """Add the OAuth routes (the table above)."""
    register_routes(state, OAUTH, ROUTES)
