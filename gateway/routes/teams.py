"""``/v1/api-keys*``, ``/v1/users/search`` and ``/v1/teams*`` (capsules
reference, tags api-keys/users/teams).

Every route here is ``sessionAuth`` in the reference: a request that brings
only ``X-API-Key`` is refused with 403 ``session_required`` (API keys are for
capsule operations, and cannot mint keys or manage teams). Auth decides the
rest: ``/v1/teams/{id}*`` must name the caller's active team (403 otherwise),
roles are read from its database.
"""

from __future__ import annotations

from quart import request

from dovecote.bus.messages import auth_teams as t
from dovecote.gateway.calls import client_info
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routing import Call, Family, Route, path_id, register_routes
from dovecote.gateway.schemas import teams as s
from dovecote.gateway.state import GatewayState

MAX_ID = 64


def _id(value: str, what: str = "id") -> str:
    """A path identifier, or 400 (ids are short printable tokens)."""
    return path_id(value, ApiError(400, "invalid_request", f"invalid {what}"))


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


def _team(c: Call) -> str:
    return _id(c.params["id"])


def _user(c: Call) -> str:
    return _id(c.params["uid"], "user id")


TEAMS = Family(tags=["teams"], service="auth", auth="session")
"""Session only: a request with just ``X-API-Key`` is 403 ``session_required``."""

ROUTES = [
    # -- API keys --------------------------------------------------------------
    Route(method="POST", path="/v1/api-keys", name="create_api_key", summary="Create an API key",
          tags=["api-keys"], request=s.CreateAPIKeyRequest, response=s.CreatedAPIKeyResponse,
          status=201, message=lambda c: t.CreateApiKey(actor=c.actor, name=c.body.name,
                                                       client=client_info()),
          reply=lambda reply: reply.body),
    Route(method="GET", path="/v1/api-keys", name="list_api_keys",
          summary="List API keys for your team", tags=["api-keys"], response=list[s.APIKeyResponse],
          message=lambda c: t.ListApiKeys(actor=c.actor), reply=lambda reply: reply.keys),
    Route(method="DELETE", path="/v1/api-keys/{id}", name="delete_api_key",
          summary="Delete an API key", tags=["api-keys"], status=204,
          message=lambda c: t.DeleteApiKey(actor=c.actor, key_id=_team(c), client=client_info())),
    # -- users -----------------------------------------------------------------
    Route(method="GET", path="/v1/users/search", name="search_users",
          summary="Search users by email prefix", tags=["users"], response=list[s.UserSearchResult],
          query=s.UserSearchQuery, parse_query=False,
          message=lambda c: t.SearchUsers(actor=c.actor, email=_email_prefix()),
          reply=lambda reply: reply.users),
    # -- teams -----------------------------------------------------------------
    Route(method="GET", path="/v1/teams", name="list_teams",
          summary="List teams for the authenticated user", response=list[s.TeamWithRole],
          message=lambda c: t.ListTeams(actor=c.actor), reply=lambda reply: reply.teams),
    Route(method="POST", path="/v1/teams", name="create_team", summary="Create a new team",
          request=s.CreateTeamRequest, response=s.TeamWithRole, status=201,
          message=lambda c: t.CreateTeam(actor=c.actor, name=c.body.name, client=client_info()),
          reply=lambda reply: reply.body),
    Route(method="GET", path="/v1/teams/{id}", name="get_team",
          summary="Get team info and member list", response=s.TeamDetail,
          message=lambda c: t.GetTeam(actor=c.actor, team_id=_team(c)), reply=lambda reply: reply.body),
    Route(method="PATCH", path="/v1/teams/{id}", name="rename_team", summary="Rename the team",
          request=s.RenameTeamRequest, status=204,
          message=lambda c: t.RenameTeam(actor=c.actor, team_id=_team(c), name=c.body.name,
                                         client=client_info())),
    Route(method="DELETE", path="/v1/teams/{id}", name="delete_team", summary="Delete the team",
          status=204,
          message=lambda c: t.DeleteTeam(actor=c.actor, team_id=_team(c), client=client_info())),
    Route(method="GET", path="/v1/teams/{id}/members", name="list_team_members",
          summary="List team members", response=list[s.TeamMember],
          message=lambda c: t.ListMembers(actor=c.actor, team_id=_team(c)),
          reply=lambda reply: reply.members),
    Route(method="POST", path="/v1/teams/{id}/members", name="add_team_member",
          summary="Add a member by email", request=s.AddMemberRequest, response=s.TeamMember,
          status=201,
          message=lambda c: t.AddMember(actor=c.actor, team_id=_team(c), email=c.body.email,
                                        client=client_info()),
          reply=lambda reply: reply.body),
    Route(method="PATCH", path="/v1/teams/{id}/members/{uid}", name="update_member_role",
          summary="Update member role", request=s.UpdateMemberRoleRequest, status=204,
          message=lambda c: t.UpdateMemberRole(actor=c.actor, team_id=_team(c), user_id=_user(c),
                                               role=c.body.role, client=client_info())),
    Route(method="DELETE", path="/v1/teams/{id}/members/{uid}", name="remove_team_member",
          summary="Remove a member", status=204,
          message=lambda c: t.RemoveMember(actor=c.actor, team_id=_team(c), user_id=_user(c),
                                           client=client_info())),
    Route(method="POST", path="/v1/teams/{id}/leave", name="leave_team", summary="Leave the team",
          status=204,
          message=lambda c: t.LeaveTeam(actor=c.actor, team_id=_team(c), client=client_info())),
]


def register(state: GatewayState) -> None:
    """Add the API key, user search and team routes (the table above)."""
    register_routes(state, TEAMS, ROUTES)
