"""Bodies of ``/v1/api-keys*``, ``/v1/users/search`` and ``/v1/teams*`` (capsules reference)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from dovecote.bus.messages.auth_teams import (
    APIKeyResponse,
    CreatedAPIKeyResponse,
    Team,
    TeamDetail,
    TeamMember,
    TeamWithRole,
    UserSearchResult,
)
from dovecote.gateway.schemas.accounts import Email, Request

# The reference says "1-128 chars; A-Z a-z 0-9 space _"; its server also
# takes - @ ' (default teams are "Ana's team"). Auth trims and checks again.
TeamName = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9 _\-@']+$")]
KeyName = Annotated[str, msgspec.Meta(max_length=128)]


class CreateAPIKeyRequest(Request):
    name: KeyName = "Unnamed API Key"


class CreateTeamRequest(Request):
    name: TeamName


class RenameTeamRequest(Request):
    name: TeamName


class AddMemberRequest(Request):
    email: Email


class UpdateMemberRoleRequest(Request):
    role: Literal["admin", "member"]


__all__ = [
    "APIKeyResponse", "AddMemberRequest", "CreateAPIKeyRequest", "CreateTeamRequest",
    "CreatedAPIKeyResponse", "RenameTeamRequest", "Team", "TeamDetail", "TeamMember",
    "TeamWithRole", "UpdateMemberRoleRequest", "UserSearchResult",
]


class UserSearchQuery(msgspec.Struct, kw_only=True):
    """Query parameters of ``/v1/users/search`` (documentation only)."""

    email: Annotated[str, msgspec.Meta(min_length=3, max_length=254)]
