"""Messages of the auth service for teams, members, user search and API keys.

The gateway forwards each ``/v1/teams*``, ``/v1/users/search`` and
``/v1/api-keys*`` request as one message carrying the caller
(:class:`Principal`) and, for state changes, the HTTP client
(:class:`ClientInfo`). Replies carry the reference's response bodies (the
plain Structs named like its schemas) or
:class:`~dovecote.bus.messages.auth.Done` for 204; refusals are a
:class:`~dovecote.bus.messages.common.Failure`.

After a team is soft-deleted auth publishes :class:`TeamDeleted` on the event
topic ``team.deleted`` (see :data:`TEAM_DELETED_TOPIC`), so the services that
own a team's resources (capsules, hosts, channels) can release them.
"""

from __future__ import annotations

import msgspec

from .auth import Done
from .base import Family, Message, Request
from .common import ClientInfo, Principal

TEAM_DELETED_TOPIC = "team.deleted"

# -- response bodies (the reference's schemas) ---------------------------------


class APIKeyResponse(msgspec.Struct, kw_only=True):
    """The reference's ``APIKeyResponse`` as listed: never the key itself."""

    id: str
    team_id: str
    name: str
    key_prefix: str
    created_at: str
    last_used: str | None = None


class CreatedAPIKeyResponse(APIKeyResponse, kw_only=True):
    """``APIKeyResponse`` of a new key: the plaintext ``key``, shown once."""

    key: str


class UserSearchResult(msgspec.Struct, kw_only=True):
    user_id: str
    email: str


class Team(msgspec.Struct, kw_only=True):
    id: str
    name: str
    slug: str
    created_at: str


class TeamWithRole(Team, kw_only=True):
    role: str


class TeamMember(msgspec.Struct, kw_only=True):
    user_id: str
    email: str
    role: str
    joined_at: str


class TeamDetail(msgspec.Struct, kw_only=True):
    team: Team
    members: list[TeamMember]


# -- API keys -----------------------------------------------------------------


class CreateApiKey(Request["ApiKeyCreated"], tag="auth.api_keys.create", kw_only=True):
    actor: Principal
    name: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class ApiKeyCreated(Message, tag="auth.api_keys.created", kw_only=True):
    body: CreatedAPIKeyResponse


class ListApiKeys(Request["ApiKeysReply"], tag="auth.api_keys.list", kw_only=True):
    actor: Principal


class ApiKeysReply(Message, tag="auth.api_keys.list_reply", kw_only=True):
    keys: list[APIKeyResponse]


class DeleteApiKey(Request[Done], tag="auth.api_keys.delete", kw_only=True):
    actor: Principal
    key_id: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class CreateLocalKey(Request["LocalKeyCreated"], tag="auth.api_keys.create_local", kw_only=True):
    """``dovecote key create``: an API key of the account with ``email``, made on the spot.

    No caller: its right to ask is its access to the suite's bus (as for
    ``dovecote admin create``). A missing account is created active, without a
    password, with a default team of its own; an inactive one is activated.
    The key belongs to the account's default team.
    """

    email: str
    name: str = ""
    key_name: str = "dovecote CLI"


class LocalKeyCreated(Message, tag="auth.api_keys.local_created", kw_only=True):
    body: CreatedAPIKeyResponse
    user_id: str
    email: str
    account_created: bool


# -- user search --------------------------------------------------------------


class SearchUsers(Request["UsersReply"], tag="auth.users.search", kw_only=True):
    actor: Principal
    email: str


class UsersReply(Message, tag="auth.users.search_reply", kw_only=True):
    users: list[UserSearchResult]


# -- teams --------------------------------------------------------------------


class ListTeams(Request["TeamsReply"], tag="auth.teams.list", kw_only=True):
    actor: Principal


class TeamsReply(Message, tag="auth.teams.list_reply", kw_only=True):
    teams: list[TeamWithRole]


class CreateTeam(Request["TeamReply"], tag="auth.teams.create", kw_only=True):
    actor: Principal
    name: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class TeamReply(Message, tag="auth.teams.team_reply", kw_only=True):
    body: TeamWithRole


class GetTeam(Request["TeamDetailReply"], tag="auth.teams.get", kw_only=True):
    actor: Principal
    team_id: str


class TeamDetailReply(Message, tag="auth.teams.detail_reply", kw_only=True):
    body: TeamDetail


class RenameTeam(Request[Done], tag="auth.teams.rename", kw_only=True):
    actor: Principal
    team_id: str
    name: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class DeleteTeam(Request[Done], tag="auth.teams.delete", kw_only=True):
    actor: Principal
    team_id: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class ListMembers(Request["MembersReply"], tag="auth.teams.members", kw_only=True):
    actor: Principal
    team_id: str


class MembersReply(Message, tag="auth.teams.members_reply", kw_only=True):
    members: list[TeamMember]


class AddMember(Request["MemberReply"], tag="auth.teams.add_member", kw_only=True):
    actor: Principal
    team_id: str
    email: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class MemberReply(Message, tag="auth.teams.member_reply", kw_only=True):
    body: TeamMember


class UpdateMemberRole(Request[Done], tag="auth.teams.update_role", kw_only=True):
    actor: Principal
    team_id: str
    user_id: str
    role: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class RemoveMember(Request[Done], tag="auth.teams.remove_member", kw_only=True):
    actor: Principal
    team_id: str
    user_id: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class LeaveTeam(Request[Done], tag="auth.teams.leave", kw_only=True):
    actor: Principal
    team_id: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


# -- events -------------------------------------------------------------------


class TeamDeleted(Message, tag="auth.teams.deleted", kw_only=True):
    """Event on ``team.deleted``: the team is gone; release what it owns.

    ``deleted_at`` is RFC 3339; ``actor`` is the owner who deleted it.
    """

    team_id: str
    deleted_at: str
    actor: Principal


FAMILY = Family("auth_teams", __name__)
"""The auth_teams messages and their one Decoder (define every message above this line)."""
