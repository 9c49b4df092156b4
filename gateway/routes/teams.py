"""``/v1/api-keys*``, ``/v1/users/search`` and ``/v1/teams*`` (capsules
reference, tags api-keys/users/teams).

Every route here is ``sessionAuth`` in the reference: a request that brings
only ``X-API-Key`` is refused with 403 ``session_required`` (API keys are for
capsule operations, and cannot mint keys or manage teams). Auth decides the
rest: ``/v1/teams/{id}*`` must name the caller's active team (403 otherwise),
roles are read from its database.
"""

from __future__ import annotations

from quart import Response, request

from dovecote.bus.messages import auth_teams as t
from dovecote.gateway.calls import call, client_info, json_response, no_content, parse_body
from dovecote.gateway.errors import ApiError
from dovecote.gateway.schemas import teams as s
from dovecote.gateway.state import GatewayState

MAX_ID = 64


def _id(value: str, what: str = "id") -> str:
    """A path identifier, or 400 (ids are short printable tokens)."""
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise ApiError(400, "invalid_request", f"invalid {what}")
    return value


def _email_prefix() -> str:
    """The ``email`` query parameter of the user search, or 400."""
    values = request.args.getlist("email")
    if len(values) != 1:
        raise ApiError(400, "invalid_request", "exactly one email query parameter is required")
    prefix = values[0].strip()
    if "@" not in prefix or not 3 <= len(prefix) <= 254 or not prefix.isprintable():
        raise ApiError(400, "invalid_request",
                       "email must be a prefix of 3 to 254 characters containing '@'")
    return prefix


def register(state: GatewayState) -> None:
    """Add the API key, user search and team routes."""
    api, app, edge = state.api, state.app, state.edge

    # -- API keys --------------------------------------------------------------

    @api.route(app, "POST", "/v1/api-keys", summary="Create an API key", tags=["api-keys"],
               request=s.CreateAPIKeyRequest, responses={201: s.CreatedAPIKeyResponse})
    async def create_api_key() -> Response:
        actor = await edge.authenticate(session_only=True)
        body = await parse_body(s.CreateAPIKeyRequest)
        reply = await call(state, "auth", t.CreateApiKey(actor=actor, name=body.name,
                                                         client=client_info()))
        return json_response(reply.body, 201)

    @api.route(app, "GET", "/v1/api-keys", summary="List API keys for your team",
               tags=["api-keys"], responses={200: list[s.APIKeyResponse]})
    async def list_api_keys() -> Response:
        actor = await edge.authenticate(session_only=True)
        reply = await call(state, "auth", t.ListApiKeys(actor=actor))
        return json_response(reply.keys)

    @api.route(app, "DELETE", "/v1/api-keys/{id}", summary="Delete an API key",
               tags=["api-keys"], responses={204: None})
    async def delete_api_key(id: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        await call(state, "auth", t.DeleteApiKey(actor=actor, key_id=_id(id),
                                                 client=client_info()))
        return no_content()

    # -- users -----------------------------------------------------------------

    @api.route(app, "GET", "/v1/users/search", summary="Search users by email prefix",
               tags=["users"], responses={200: list[s.UserSearchResult]}, query=s.UserSearchQuery)
    async def search_users() -> Response:
        actor = await edge.authenticate(session_only=True)
        reply = await call(state, "auth", t.SearchUsers(actor=actor, email=_email_prefix()))
        return json_response(reply.users)

    # -- teams -----------------------------------------------------------------

    @api.route(app, "GET", "/v1/teams", summary="List teams for the authenticated user",
               tags=["teams"], responses={200: list[s.TeamWithRole]})
    async def list_teams() -> Response:
        actor = await edge.authenticate(session_only=True)
        reply = await call(state, "auth", t.ListTeams(actor=actor))
        return json_response(reply.teams)

    @api.route(app, "POST", "/v1/teams", summary="Create a new team", tags=["teams"],
               request=s.CreateTeamRequest, responses={201: s.TeamWithRole})
    async def create_team() -> Response:
        actor = await edge.authenticate(session_only=True)
        body = await parse_body(s.CreateTeamRequest)
        reply = await call(state, "auth", t.CreateTeam(actor=actor, name=body.name,
                                                       client=client_info()))
        return json_response(reply.body, 201)

    @api.route(app, "GET", "/v1/teams/{id}", summary="Get team info and member list",
               tags=["teams"], responses={200: s.TeamDetail})
    async def get_team(id: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        reply = await call(state, "auth", t.GetTeam(actor=actor, team_id=_id(id)))
        return json_response(reply.body)

    @api.route(app, "PATCH", "/v1/teams/{id}", summary="Rename the team", tags=["teams"],
               request=s.RenameTeamRequest, responses={204: None})
    async def rename_team(id: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        body = await parse_body(s.RenameTeamRequest)
        await call(state, "auth", t.RenameTeam(actor=actor, team_id=_id(id), name=body.name,
                                               client=client_info()))
        return no_content()

    @api.route(app, "DELETE", "/v1/teams/{id}", summary="Delete the team", tags=["teams"],
               responses={204: None})
    async def delete_team(id: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        await call(state, "auth", t.DeleteTeam(actor=actor, team_id=_id(id),
                                               client=client_info()))
        return no_content()

    @api.route(app, "GET", "/v1/teams/{id}/members", summary="List team members",
               tags=["teams"], responses={200: list[s.TeamMember]})
    async def list_team_members(id: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        reply = await call(state, "auth", t.ListMembers(actor=actor, team_id=_id(id)))
        return json_response(reply.members)

    @api.route(app, "POST", "/v1/teams/{id}/members", summary="Add a member by email",
               tags=["teams"], request=s.AddMemberRequest, responses={201: s.TeamMember})
    async def add_team_member(id: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        body = await parse_body(s.AddMemberRequest)
        reply = await call(state, "auth", t.AddMember(actor=actor, team_id=_id(id),
                                                      email=body.email, client=client_info()))
        return json_response(reply.body, 201)

    @api.route(app, "PATCH", "/v1/teams/{id}/members/{uid}", summary="Update member role",
               tags=["teams"], request=s.UpdateMemberRoleRequest, responses={204: None})
    async def update_member_role(id: str, uid: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        body = await parse_body(s.UpdateMemberRoleRequest)
        await call(state, "auth", t.UpdateMemberRole(
            actor=actor, team_id=_id(id), user_id=_id(uid, "user id"), role=body.role,
            client=client_info()))
        return no_content()

    @api.route(app, "DELETE", "/v1/teams/{id}/members/{uid}", summary="Remove a member",
               tags=["teams"], responses={204: None})
    async def remove_team_member(id: str, uid: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        await call(state, "auth", t.RemoveMember(actor=actor, team_id=_id(id),
                                                 user_id=_id(uid, "user id"),
                                                 client=client_info()))
        return no_content()

    @api.route(app, "POST", "/v1/teams/{id}/leave", summary="Leave the team", tags=["teams"],
               responses={204: None})
    async def leave_team(id: str) -> Response:
        actor = await edge.authenticate(session_only=True)
        await call(state, "auth", t.LeaveTeam(actor=actor, team_id=_id(id),
                                              client=client_info()))
        return no_content()
