"""Reading the audit log: a team's own listing and the platform admins' one.

Pages are newest first by entry id (a ``bigserial``), and the cursor is the
id of the last entry of the page (``before_id``), encoded as ``aud_`` and 16
hex digits. Paging by id rather than by ``created_at`` is what keeps pages
stable while entries are being written: a new entry always gets a larger id,
so it can only appear before the first page, never shift a later one (no
duplicates, no gaps), and entries written in one transaction (one
``created_at``) are never split or skipped. ``before`` alone bounds the
listing by time; when ``before_id`` is given as well it is ignored, because
``created_at`` is the start of the writing transaction and is not monotonic
in the id.

Who reads what: the team listing needs a session whose role in its active
team is ``owner`` or ``admin``, and shows that team's ``team`` and ``user``
scope entries; the platform operators' ``admin`` entries (BYOC toggles, team
deletion) are only in the admin listing, which shows every entry.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, LiteralString

from dovecote.bus.messages import auth_admin as a
from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError
from dovecote.libs.timefmt import rfc3339
from dovecote.services.auth.access import MANAGERS, require_platform_admin, require_session
from dovecote.services.auth.context import AuthContext

MAX_LIMIT = 200
_ENTRY_ID = re.compile(r"^aud_([0-9a-f]{16})$")


def encode_id(entry_id: int) -> str:
    """The public id of an audit entry (also its cursor)."""
    return f"aud_{entry_id:016x}"


def decode_id(value: str) -> int:
    """The row id behind a public entry id, or 400 ``invalid_cursor``."""
    match = _ENTRY_ID.match(value)
    entry_id = int(match.group(1), 16) if match else 0
    if not 0 < entry_id < 2**63:
        raise ServiceError(400, "invalid_cursor", "before_id is not a cursor this API returned")
    return entry_id


def check_limit(limit: int) -> int:
    """``limit`` if it is 1 to 200, else 400."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ServiceError(400, "invalid_request", f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def page(conn: Connection, *, team_id: str | None, before: datetime | None,
         before_id: str | None, limit: int) -> a.AuditLogPage:
    """One page of entries (of ``team_id``, or of every team when None)."""
    check_limit(limit)
    where: list[LiteralString] = []
    params: list[Any] = []
    if team_id is not None:
        where.append("team_id = %s AND scope <> 'admin'")
        params.append(team_id)
    if before_id is not None:
        where.append("id < %s")
        params.append(decode_id(before_id))
    elif before is not None:
        where.append("created_at < %s")
        params.append(before)
    condition: LiteralString = " AND ".join(where) if where else "true"
    rows = conn.execute(
        "SELECT id, actor_type, actor_id, actor_name, resource_type, resource_id, action, "
        "scope, status, metadata, created_at FROM audit_log WHERE " + condition
        + " ORDER BY id DESC LIMIT %s", (*params, limit + 1)).fetchall()
    entries = [a.AuditLogEntry(
        id=encode_id(r["id"]), actor_type=r["actor_type"], actor_id=r["actor_id"],
        actor_name=r["actor_name"], resource_type=r["resource_type"],
        resource_id=r["resource_id"], action=r["action"], scope=r["scope"], status=r["status"],
        metadata=r["metadata"] if isinstance(r["metadata"], dict) else {},
        created_at=rfc3339(r["created_at"])) for r in rows[:limit]]
    cursor = None
    if len(rows) > limit:
        cursor = a.AuditCursor(before=entries[-1].created_at, before_id=entries[-1].id)
    return a.AuditLogPage(entries=entries, next_cursor=cursor)


class AuditLog:
    """The handlers of the audit log listings."""

    def __init__(self, ctx: AuthContext) -> None:
        self.ctx = ctx

    async def list_team(self, msg: a.ListAuditLogs) -> a.AuditLogReply:
        actor = msg.actor
        require_session(actor)
        if actor.role not in MANAGERS:
            raise ServiceError(403, "forbidden", "only team owners and admins can read the audit log")
        result = await self.ctx.db.transaction(lambda conn: page(
            conn, team_id=actor.team_id, before=msg.before, before_id=msg.before_id,
            limit=msg.limit))
        return a.AuditLogReply(page=result)

    async def list_all(self, msg: a.AdminListAuditLogs) -> a.AuditLogReply:
        def work(conn: Connection) -> a.AuditLogPage:
            require_platform_admin(conn, msg.actor)
            return page(conn, team_id=None, before=msg.before, before_id=msg.before_id,
                        limit=msg.limit)

        return a.AuditLogReply(page=await self.ctx.db.transaction(work))

    def register(self, handle: Any) -> None:
        """Register every handler with the service's dispatcher."""
        handle(a.ListAuditLogs, self.list_team)
        handle(a.AdminListAuditLogs, self.list_all)
