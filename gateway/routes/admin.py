"""``/v1/audit-logs`` and the admin plane ``/v1/admin/{audit-logs,users,teams}``
(capsules reference, tags audit and admin).

Every admin route needs a session of a platform admin: anyone else gets 403
before the body is read (auth checks the flag again in the database). The
audit listings take ``before`` (RFC 3339), ``before_id`` (the opaque cursor
of ``next_cursor``) and ``limit`` (1 to 200, default 50); bad values are 400.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from quart import Response, request

from dovecote.bus.messages import auth_admin as a
from dovecote.gateway.calls import call, client_info, json_response, no_content, parse_body
from dovecote.gateway.errors import ApiError
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


def register(state: GatewayState) -> None:
    """Add the audit log and admin routes."""
    api, app, edge = state.api, state.app, state.edge

    platform_admin = edge.platform_admin

    @api.route(app, "GET", "/v1/audit-logs", summary="List team audit log entries",
               tags=["audit"], responses={200: s.AuditLogPage}, query=s.AuditLogQuery)
    async def list_audit_logs() -> Response:
        actor = await edge.authenticate(session_only=True)
        before, before_id, limit = page_query()
        reply = await call(state, "auth", a.ListAuditLogs(
            actor=actor, before=before, before_id=before_id, limit=limit))
        return json_response(reply.page)

    @api.route(app, "GET", "/v1/admin/audit-logs", summary="List audit log entries (all teams)",
               tags=["admin", "audit"], responses={200: s.AuditLogPage}, query=s.AuditLogQuery)
    async def admin_list_audit_logs() -> Response:
        actor = await platform_admin()
        before, before_id, limit = page_query()
        reply = await call(state, "auth", a.AdminListAuditLogs(
            actor=actor, before=before, before_id=before_id, limit=limit))
        return json_response(reply.page)

    @api.route(app, "GET", "/v1/admin/users", summary="List all users (admin)", tags=["admin"],
               responses={200: s.AdminUsers})
    async def admin_list_users() -> Response:
        reply = await call(state, "auth", a.AdminListUsers(actor=await platform_admin()))
        return json_response(reply.users)

    @api.route(app, "PUT", "/v1/admin/users/{id}/active",
               summary="Activate or deactivate a user (admin)", tags=["admin"],
               request=s.SetActiveRequest, responses={204: None})
    async def admin_set_user_active(id: str) -> Response:
        actor = await platform_admin()
        body = await parse_body(s.SetActiveRequest)
        await call(state, "auth", a.AdminSetUserActive(actor=actor, user_id=id, active=body.active,
                                                       client=client_info()))
        return no_content()

    @api.route(app, "PUT", "/v1/admin/users/{id}/admin", summary="Grant or revoke platform admin",
               tags=["admin"], request=s.SetAdminRequest, responses={204: None})
    async def admin_set_user_admin(id: str) -> Response:
        actor = await platform_admin()
        body = await parse_body(s.SetAdminRequest)
        await call(state, "auth", a.AdminSetUserAdmin(actor=actor, user_id=id, admin=body.admin,
                                                      client=client_info()))
        return no_content()

    @api.route(app, "GET", "/v1/admin/teams", summary="List all teams (admin)", tags=["admin"],
               responses={200: s.AdminTeams})
    async def admin_list_teams() -> Response:
        reply = await call(state, "auth", a.AdminListTeams(actor=await platform_admin()))
        return json_response(reply.teams)

    @api.route(app, "PUT", "/v1/admin/teams/{id}/byoc", summary="Toggle BYOC for a team (admin)",
               tags=["admin"], request=s.SetByocRequest, responses={204: None})
    async def admin_set_team_byoc(id: str) -> Response:
        actor = await platform_admin()
        body = await parse_body(s.SetByocRequest)
        await call(state, "auth", a.AdminSetTeamByoc(actor=actor, team_id=id, byoc=body.byoc,
                                                     client=client_info()))
        return no_content()

    @api.route(app, "DELETE", "/v1/admin/teams/{id}", summary="Delete a team (admin)",
               tags=["admin"], responses={204: None})
    async def admin_delete_team(id: str) -> Response:
        actor = await platform_admin()
        await call(state, "auth", a.AdminDeleteTeam(actor=actor, team_id=id, client=client_info()))
        return no_content()
