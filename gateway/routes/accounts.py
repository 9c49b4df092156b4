"""``/v1/auth/*`` and ``/v1/me*``: sign-up, activation, login, sessions, the
caller's account and password (capsules reference, tags auth/me/account)."""

from __future__ import annotations

from quart import Response

from dovecote.bus.messages import auth as m
from dovecote.gateway.calls import call, client_info, json_response, no_content, parse_body
from dovecote.gateway.edge import clear_session_cookies, set_session_cookies
from dovecote.gateway.schemas import accounts as s
from dovecote.gateway.state import GatewayState


def _session_response(issued: m.SessionIssued) -> Response:
    response = json_response(issued.body)
    set_session_cookies(response, issued.sid, issued.csrf, issued.max_age_s)
    return response


def register(state: GatewayState) -> None:
    """Add the accounts routes."""
    api, app, edge = state.api, state.app, state.edge

    @api.route(app, "POST", "/v1/auth/signup", summary="Create a new account", tags=["auth"],
               request=s.SignupRequest, responses={201: s.SignupResponse}, security=False)
    async def signup() -> Response:
        body = await parse_body(s.SignupRequest)
        reply = await call(state, "auth", m.Signup(email=body.email, password=body.password,
                                                   name=body.name, client=client_info()))
        return json_response(s.SignupResponse(message=reply.message), 201)

    @api.route(app, "POST", "/v1/auth/activate", summary="Activate account via email token",
               tags=["auth"], request=s.ActivateRequest, responses={200: s.SessionResponse},
               security=False)
    async def activate() -> Response:
        body = await parse_body(s.ActivateRequest)
        return _session_response(await call(state, "auth", m.Activate(token=body.token,
                                                                       client=client_info())))

    @api.route(app, "POST", "/v1/auth/login", summary="Log in with email and password",
               tags=["auth"], request=s.LoginRequest, responses={200: s.SessionResponse},
               security=False)
    async def login() -> Response:
        body = await parse_body(s.LoginRequest)
        return _session_response(await call(state, "auth", m.Login(
            email=body.email, password=body.password, client=client_info())))

    @api.route(app, "POST", "/v1/auth/logout", summary="Revoke the current session", tags=["auth"],
               responses={204: None})
    async def logout() -> Response:
        actor = await edge.authenticate(session_only=True)
        await call(state, "auth", m.Logout(actor=actor, client=client_info()))
        response = no_content()
        clear_session_cookies(response)
        return response

    @api.route(app, "POST", "/v1/auth/logout-all", summary="Revoke every session for the current user",
               tags=["auth"], responses={204: None})
    async def logout_all() -> Response:
        actor = await edge.authenticate(session_only=True)
        await call(state, "auth", m.LogoutAll(actor=actor, client=client_info()))
        response = no_content()
        clear_session_cookies(response)
        return response

    @api.route(app, "POST", "/v1/auth/switch-team", summary="Switch active team", tags=["auth"],
               request=s.SwitchTeamRequest, responses={200: s.SessionResponse})
    async def switch_team() -> Response:
        actor = await edge.authenticate(session_only=True)
        body = await parse_body(s.SwitchTeamRequest)
        return _session_response(await call(state, "auth", m.SwitchTeam(
            actor=actor, team_id=body.team_id, client=client_info())))

    @api.route(app, "GET", "/v1/me/sessions", summary="List the caller's active sessions",
               tags=["me"], responses={200: s.SessionsResponse})
    async def list_sessions() -> Response:
        actor = await edge.authenticate(session_only=True)
        reply = await call(state, "auth", m.ListSessions(actor=actor))
        return json_response(s.SessionsResponse(sessions=reply.sessions))

    @api.route(app, "DELETE", "/v1/me/sessions/{id}", summary="Revoke a single session",
               tags=["me"], responses={204: None})
    async def revoke_session(id: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        await call(state, "auth", m.RevokeSession(actor=actor, session_id=id, client=client_info()))
        return no_content()

    @api.route(app, "GET", "/v1/me", summary="Get current user profile", tags=["account"],
               responses={200: s.MeResponse})
    async def get_me() -> Response:
        actor = await edge.authenticate(session_only=True)
        reply = await call(state, "auth", m.GetMe(actor=actor))
        return json_response(reply.body)

    @api.route(app, "PATCH", "/v1/me", summary="Update display name", tags=["account"],
               request=s.UpdateNameRequest, responses={204: None})
    async def update_me() -> Response:
        actor = await edge.authenticate(session_only=True)
        body = await parse_body(s.UpdateNameRequest)
        await call(state, "auth", m.UpdateMe(actor=actor, name=body.name, client=client_info()))
        return no_content()

    @api.route(app, "DELETE", "/v1/me", summary="Delete current account", tags=["account"],
               request=s.DeleteAccountRequest, responses={204: None})
    async def delete_me() -> Response:
        actor = await edge.authenticate(session_only=True)
        body = await parse_body(s.DeleteAccountRequest)
        await call(state, "auth", m.DeleteMe(actor=actor, confirmation=body.confirmation,
                                             client=client_info()))
        response = no_content()
        clear_session_cookies(response)
        return response

    @api.route(app, "POST", "/v1/me/password", summary="Change or add password", tags=["account"],
               request=s.ChangePasswordRequest, responses={204: None})
    async def change_password() -> Response:
        actor = await edge.authenticate(session_only=True)
        body = await parse_body(s.ChangePasswordRequest)
        await call(state, "auth", m.ChangePassword(
            actor=actor, new_password=body.new_password, current_password=body.current_password,
            confirm_password=body.confirm_password, client=client_info()))
        response = no_content()
        clear_session_cookies(response)
        return response

    @api.route(app, "POST", "/v1/me/password/reset", summary="Request a password reset email",
               tags=["account"], request=s.PasswordResetRequest, responses={204: None},
               security=False)
    async def request_reset() -> Response:
        body = await parse_body(s.PasswordResetRequest)
        await call(state, "auth", m.RequestPasswordReset(email=body.email, client=client_info()))
        return no_content()

    @api.route(app, "POST", "/v1/me/password/reset/confirm", summary="Confirm password reset",
               tags=["account"], request=s.PasswordResetConfirmRequest, responses={204: None},
               security=False)
    async def confirm_reset() -> Response:
        body = await parse_body(s.PasswordResetConfirmRequest)
        await call(state, "auth", m.ConfirmPasswordReset(token=body.token,
                                                         new_password=body.new_password,
                                                         client=client_info()))
        return no_content()
