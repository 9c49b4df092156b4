"""``/v1/audit-logs`` and the admin plane ``/v1/admin/{audit-logs,users,teams}``
(capsules reference, tags audit and admin).

Every admin route needs a session of a platform admin: anyone else gets 403
before the body is read (auth checks the flag again in the database). The
audit listings take ``before`` (RFC 3339), ``before_id`` (the opaque cursor
of ``next_cursor``) and ``limit`` (1 to 200, default 50); bad values are 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from quart import request

from dovecote.bus.messages import auth_admin as a
from dovecote.gateway.calls import client_info
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routing import Call, Family, Route, register_routes
from dovecote.gateway.schemas import admin as s
from dovecote.gateway.state import GatewayState

DEFAULT_LIMIT, MAX_LIMIT = 50, 200
_DIGITS = re.compile(r"^[0-9]{1,6}$")


def page_query() -> tuple[datetime | None, str | None, int]:
    """``(before, before_id, limit)`` from the query string, or 400."""
    args = request.args
    raw_limit = args.get("limit", str(DEFAULT_LIMIT)).strip()
    if not _DIGITS.match(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise ApiError(400, "invalid_request", f"limit must be an integer from 1 to {MAX_LIMIT}")
    before: datetime | None = None
    raw_before = args.get("before")
    if raw_before is not None:
        # An unencoded "+01:00" arrives as " 01:00".
        text = raw_before.strip().replace(" ", "+")
        try:
            before = datetime.fromisoformat(text) if "T" in text or "t" in text else None
        except ValueError:
            before = None
        if before is None:
            raise ApiError(400, "invalid_request", "before must be an RFC 3339 date-time")
        if before.tzinfo is None:
            before = before.replace(tzinfo=UTC)
    before_id = args.get("before_id")
    if before_id is not None and not 1 <= len(before_id) <= 64:
        raise ApiError(400, "invalid_cursor", "before_id is not a cursor this API returned")
    return before, before_id, int(raw_limit)


def _audit_page(kind: type[a.ListAuditLogs] | type[a.AdminListAuditLogs]) -> Callable[[Call], Any]:
    def build(ctx: Call) -> Any:
        before, before_id, limit = page_query()
        return kind(actor=ctx.actor, before=before, before_id=before_id, limit=limit)
    return build


ADMIN = Family(tags=["admin"], service="auth", auth="admin")

ROUTES = [
    Route(method="GET", path="/v1/audit-logs", name="list_audit_logs",
          summary="List team audit log entries", tags=["audit"], auth="session",
          response=s.AuditLogPage, query=s.AuditLogQuery, parse_query=False,
          message=_audit_page(a.ListAuditLogs), reply=lambda reply: reply.page),
    Route(method="GET", path="/v1/admin/audit-logs", name="admin_list_audit_logs",
          summary="List audit log entries (all teams)", tags=["admin", "audit"],
          response=s.AuditLogPage, query=s.AuditLogQuery, parse_query=False,
          message=_audit_page(a.AdminListAuditLogs), reply=lambda reply: reply.page),
    Route(method="GET", path="/v1/admin/users", name="admin_list_users",
          summary="List all users (admin)", response=s.AdminUsers,
          message=lambda ctx: a.AdminListUsers(actor=ctx.actor), reply=lambda reply: reply.users),
    Route(method="PUT", path="/v1/admin/users/{id}/active", name="admin_set_user_active",
          summary="Activate or deactivate a user (admin)", request=s.SetActiveRequest, status=204,
          message=lambda ctx: a.AdminSetUserActive(actor=ctx.actor, user_id=ctx.params["id"],
                                                   active=ctx.body.active, client=client_info())),
    Route(method="PUT", path="/v1/admin/users/{id}/admin", name="admin_set_user_admin",
          summary="Grant or revoke platform admin", request=s.SetAdminRequest, status=204,
          message=lambda ctx: a.AdminSetUserAdmin(actor=ctx.actor, user_id=ctx.params["id"],
                                                  admin=ctx.body.admin, client=client_info())),
    Route(method="GET", path="/v1/admin/teams", name="admin_list_teams",
          summary="List all teams (admin)", response=s.AdminTeams,
          message=lambda ctx: a.AdminListTeams(actor=ctx.actor), reply=lambda reply: reply.teams),
    Route(method="PUT", path="/v1/admin/teams/{id}/byoc", name="admin_set_team_byoc",
          summary="Toggle BYOC for a team (admin)", request=s.SetByocRequest, status=204,
          message=lambda ctx: a.AdminSetTeamByoc(actor=ctx.actor, team_id=ctx.params["id"],
                                                 byoc=ctx.body.byoc, client=client_info())),
    Route(method="DELETE", path="/v1/admin/teams/{id}", name="admin_delete_team",
          summary="Delete a team (admin)", status=204,
          message=lambda ctx: a.AdminDeleteTeam(actor=ctx.actor, team_id=ctx.params["id"],
                                                client=client_info())),
]


def register(state: GatewayState) -> None:
    """Add the audit log and admin routes (the table above)."""
    register_routes(state, ADMIN, ROUTES)
