"""Messages of the auth service's audit log and admin plane (bus name ``auth``).

The gateway forwards ``/v1/audit-logs`` and ``/v1/admin/*`` as one request
each, carrying the caller (:class:`Principal`) and, for state changes, the
HTTP client. Listings answer with the documented bodies; changes answer
:class:`~dovecote.bus.messages.auth.Done` (HTTP 204) or a
:class:`~dovecote.bus.messages.common.Failure`.

:class:`CreateAdmin` has no caller: it comes from ``dovecote admin create``,
whose right to ask is its access to the suite's bus.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from .auth import Done
from .base import Family, Message, Request
from .common import ClientInfo, Principal

# -- the audit log -------------------------------------------------------------


class AuditLogEntry(msgspec.Struct, kw_only=True):
    """The reference's ``AuditLogEntry``."""

    id: str
    actor_type: str
    actor_id: str
    actor_name: str
    resource_type: str
    resource_id: str
    action: str
    scope: str
    status: str
    metadata: dict[str, Any]
    created_at: str


class AuditCursor(msgspec.Struct, kw_only=True):
    """Where the next page starts: pass both back as query parameters."""

    before: str
    before_id: str


class AuditLogPage(msgspec.Struct, kw_only=True):
    """One page, newest first; ``next_cursor`` is null on the last page."""

    entries: list[AuditLogEntry]
    next_cursor: AuditCursor | None = None


class ListAuditLogs(Request["AuditLogReply"], tag="auth.list_audit_logs", kw_only=True):
    """A page of the caller's active team's audit log.

    ``before_id`` is the opaque id of the last entry already seen; it wins
    over ``before`` (a timestamp bound) when both are given.
    """

    actor: Principal
    before: datetime | None = None
    before_id: str | None = None
    limit: int = 50


class AdminListAuditLogs(Request["AuditLogReply"], tag="auth.admin_list_audit_logs", kw_only=True):
    """A page of the audit log of every team (platform admins)."""

    actor: Principal
    before: datetime | None = None
    before_id: str | None = None
    limit: int = 50


class AuditLogReply(Message, tag="auth.audit_log_reply", kw_only=True):
    page: AuditLogPage


# -- users and teams -------------------------------------------------------------


class AdminUser(msgspec.Struct, kw_only=True):
    """One account as ``GET /v1/admin/users`` lists it."""

    id: str
    email: str
    name: str
    is_active: bool
    is_admin: bool
    has_password: bool
    team_count: int
    created_at: str
    updated_at: str


class AdminTeam(msgspec.Struct, kw_only=True):
    """One team as ``GET /v1/admin/teams`` lists it."""

    id: str
    name: str
    slug: str
    is_default: bool
    byoc: bool
    member_count: int
    owner_id: str | None
    owner_email: str | None
    created_at: str


class AdminListUsers(Request["AdminUsersReply"], tag="auth.admin_list_users", kw_only=True):
    actor: Principal


class AdminUsersReply(Message, tag="auth.admin_users_reply", kw_only=True):
    users: list[AdminUser]


class AdminListTeams(Request["AdminTeamsReply"], tag="auth.admin_list_teams", kw_only=True):
    actor: Principal


class AdminTeamsReply(Message, tag="auth.admin_teams_reply", kw_only=True):
    teams: list[AdminTeam]


class AdminSetTeamByoc(Request[Done], tag="auth.admin_set_team_byoc", kw_only=True):
    actor: Principal
    team_id: str
    byoc: bool
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class AdminDeleteTeam(Request[Done], tag="auth.admin_delete_team", kw_only=True):
    actor: Principal
    team_id: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class AdminSetUserActive(Request[Done], tag="auth.admin_set_user_active", kw_only=True):
    """Activate or deactivate; deactivation revokes every session of the user."""

    actor: Principal
    user_id: str
    active: bool
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class AdminSetUserAdmin(Request[Done], tag="auth.admin_set_user_admin", kw_only=True):
    """Grant or revoke the platform admin flag (never the last active admin's)."""

    actor: Principal
    user_id: str
    admin: bool
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


# -- ``dovecote admin create`` -----------------------------------------------------


class CreateAdmin(Request["AdminCreated"], tag="auth.create_admin", kw_only=True):
    """Create an active platform admin, or promote the live account with this email.

    ``password`` sets the password of a new account only; an existing
    account keeps its own.
    """

    email: str
    name: str
    password: str


class AdminCreated(Message, tag="auth.admin_created", kw_only=True):
    user_id: str
    email: str
    created: bool


FAMILY = Family("auth_admin", __name__)
"""The auth_admin messages and their one Decoder (define every message above this line)."""
