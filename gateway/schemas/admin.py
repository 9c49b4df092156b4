"""Bodies of ``/v1/audit-logs`` and ``/v1/admin/*`` (capsules reference)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from dovecote.bus.messages.auth_admin import (
    AdminTeam,
    AdminUser,
    AuditCursor,
    AuditLogEntry,
    AuditLogPage,
)
from dovecote.gateway.schemas.accounts import Request


class SetAdminRequest(Request):
    """``PUT /v1/admin/users/{id}/admin``: true grants, false revokes."""

    admin: bool


class SetActiveRequest(Request):
    """``PUT /v1/admin/users/{id}/active``."""

    active: bool


class SetByocRequest(Request):
    """``PUT /v1/admin/teams/{id}/byoc``."""

    byoc: bool


AdminUsers = list[AdminUser]
AdminTeams = list[AdminTeam]

__all__ = [
    "AdminTeam", "AdminTeams", "AdminUser", "AdminUsers", "AuditCursor", "AuditLogEntry",
    "AuditLogPage", "SetActiveRequest", "SetAdminRequest", "SetByocRequest",
]


class AuditLogQuery(msgspec.Struct, kw_only=True):
    """Query parameters of the audit log listings (documentation only)."""

    before: datetime | None = None
    before_id: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=200)] = 50
