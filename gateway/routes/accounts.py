"""``/v1/auth/*`` and ``/v1/me*``: sign-up, activation, login, sessions, the
caller's account and password (capsules reference, tags auth/me/account)."""

from __future__ import annotations

from quart import Response

from dovecote.bus.messages import auth as m
from dovecote.gateway.calls import client_info, json_response, no_content
from dovecote.gateway.edge import clear_session_cookies, set_session_cookies
from dovecote.gateway.routing import Family, Route, register_routes
from dovecote.gateway.schemas import accounts as s
from dovecote.gateway.state import GatewayState


def _session_response(issued: m.SessionIssued) -> Response:
    response = json_response(issued.body)
    set_session_cookies(response, issued.sid, issued.csrf, issued.max_age_s)
    return response


def _signed_out(reply: object) -> Response:
    """204, with the session cookies cleared."""
    response = no_content()
    clear_session_cookies(response)
    return response


ACCOUNTS = Family(tags=["auth"], service="auth", auth="session")

ROUTES = [
    Route(method="POST", path="/v1/auth/signup", name="signup", summary="Create a new account",
          auth="public", request=s.SignupRequest, response=s.SignupResponse, status=201,
          message=lambda c: m.Signup(email=c.body.email, password=c.body.password,
                                     name=c.body.name, client=client_info()),
          reply=lambda reply: s.SignupResponse(message=reply.message)),
    Route(method="POST", path="/v1/auth/activate", name="activate",
          summary="Activate account via email token", auth="public", request=s.ActivateRequest,
          response=s.SessionResponse,
          message=lambda c: m.Activate(token=c.body.token, client=client_info()),
          reply=_session_response),
    Route(method="POST", path="/v1/auth/login", name="login", summary="Log in with email and password",
          auth="public", request=s.LoginRequest, response=s.SessionResponse,
          message=lambda c: m.Login(email=c.body.email, password=c.body.password,
                                    client=client_info()),
          reply=_session_response),
    Route(method="POST", path="/v1/auth/logout", name="logout", summary="Revoke the current session",
          status=204, message=lambda c: m.Logout(actor=c.actor, client=client_info()),
          reply=_signed_out),
    Route(method="POST", path="/v1/auth/logout-all", name="logout_all",
          summary="Revoke every session for the current user", status=204,
          message=lambda c: m.LogoutAll(actor=c.actor, client=client_info()), reply=_signed_out),
    Route(method="POST", path="/v1/auth/switch-team", name="switch_team", summary="Switch active team",
          request=s.SwitchTeamRequest, response=s.SessionResponse,
          message=lambda c: m.SwitchTeam(actor=c.actor, team_id=c.body.team_id, client=client_info()),
          reply=_session_response),
    Route(method="GET", path="/v1/me/sessions", name="list_sessions",
          summary="List the caller's active sessions", tags=["me"], response=s.SessionsResponse,
          message=lambda c: m.ListSessions(actor=c.actor),
          reply=lambda reply: s.SessionsResponse(sessions=reply.sessions)),
    Route(method="DELETE", path="/v1/me/sessions/{id}", name="revoke_session",
          summary="Revoke a single session", tags=["me"], status=204,
          message=lambda c: m.RevokeSession(actor=c.actor, session_id=c.params["id"],
                                            client=client_info())),
    Route(method="GET", path="/v1/me", name="get_me", summary="Get current user profile",
          tags=["account"], response=s.MeResponse, message=lambda c: m.GetMe(actor=c.actor),
          reply=lambda reply: reply.body),
    Route(method="PATCH", path="/v1/me", name="update_me", summary="Update display name",
          tags=["account"], request=s.UpdateNameRequest, status=204,
          message=lambda c: m.UpdateMe(actor=c.actor, name=c.body.name, client=client_info())),
    Route(method="DELETE", path="/v1/me", name="delete_me", summary="Delete current account",
          tags=["account"], request=s.DeleteAccountRequest, status=204,
          message=lambda c: m.DeleteMe(actor=c.actor, confirmation=c.body.confirmation,
                                       client=client_info()),
          reply=_signed_out),
    Route(method="POST", path="/v1/me/password", name="change_password",
          summary="Change or add password", tags=["account"], request=s.ChangePasswordRequest,
          status=204,
          message=lambda c: m.ChangePassword(
              actor=c.actor, new_password=c.body.new_password,
              current_password=c.body.current_password, confirm_password=c.body.confirm_password,
              client=client_info()),
          reply=_signed_out),
    Route(method="POST", path="/v1/me/password/reset", name="request_reset",
          summary="Request a password reset email", tags=["account"], auth="public",
          request=s.PasswordResetRequest, status=204,
          message=lambda c: m.RequestPasswordReset(email=c.body.email, client=client_info())),
    Route(method="POST", path="/v1/me/password/reset/confirm", name="confirm_reset",
          summary="Confirm password reset", tags=["account"], auth="public",
          request=s.PasswordResetConfirmRequest, status=204,
          message=lambda c: m.ConfirmPasswordReset(token=c.body.token,
                                                   new_password=c.body.new_password,
                                                   client=client_info())),
]


def register(state: GatewayState) -> None:
    """Add the accounts routes (the table above)."""
    register_routes(state, ACCOUNTS, ROUTES)
