"""The desktops service's SQL: sessions, tasks, actions and audit (``0010_sessions.sql``).

Every read is scoped to a team: a session or task of another team is not
found. A session's API record is kept whole in ``record`` (jsonb) and
rewritten on each change; the columns beside it are what queries need.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dovecote.bus.messages import desktops as d
from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Database

HISTORY_LIMIT = 250


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _iso(value: Any) -> str:
    return value.isoformat().replace("+00:00", "Z")


def actor_of(actor: Principal) -> tuple[str, str]:
    """``(type, id)`` of who asked, for the audit trail."""
    if actor.auth_type == "api_key":
        return "api_key", actor.api_key_id
    return actor.auth_type or "user", actor.user_id


class DesktopStore:
    """SQL of the desktops service."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- sessions --------------------------------------------------------------------

    async def insert_session(self, record: d.SessionRecord, *, team_id: str, host_id: str,
                             runtime_dir: str | None) -> None:
        await self.db.execute(
            "INSERT INTO sessions (id, team_id, host_id, provider, state, runtime_dir, record) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
            (record.id, team_id, host_id, record.provider, record.state, runtime_dir, _json(record)))

    async def save_session(self, record: d.SessionRecord, *, capsule_id: str | None = None) -> None:
        await self.db.execute(
            "UPDATE sessions SET state = %s, record = %s::jsonb, "
            "  capsule_id = coalesce(%s, capsule_id), "
            "  stopped_at = CASE WHEN %s = 'stopped' THEN now() ELSE stopped_at END WHERE id = %s",
            (record.state, _json(record), capsule_id, record.state, record.id))

    async def session(self, team_id: str, session_id: str) -> dict[str, Any] | None:
        return await self.db.fetchone(
            "SELECT * FROM sessions WHERE id = %s AND team_id = %s AND state <> 'stopped'",
            (session_id, team_id))

    async def sessions(self, team_id: str) -> list[d.SessionRecord]:
        rows = await self.db.fetchall(
            "SELECT record FROM sessions WHERE team_id = %s AND state <> 'stopped' ORDER BY created_at",
            (team_id,))
        return [msgspec.convert(r["record"], d.SessionRecord) for r in rows]

    async def live_sessions(self, host_id: str) -> list[dict[str, Any]]:
        return await self.db.fetchall(
            "SELECT * FROM sessions WHERE host_id = %s AND state <> 'stopped'", (host_id,))

    async def count_live(self, team_id: str | None = None, provider: str | None = None) -> int:
        return int(await self.db.fetchval(
            "SELECT count(*) FROM sessions WHERE state <> 'stopped' "
            "AND (%(team)s::text IS NULL OR team_id = %(team)s) "
            "AND (%(provider)s::text IS NULL OR provider = %(provider)s)",
            {"team": team_id, "provider": provider}))

    async def touch(self, session_id: str) -> None:
        await self.db.execute("UPDATE sessions SET last_active_at = now() WHERE id = %s", (session_id,))

    async def idle_sessions(self, host_id: str, idle_s: float) -> list[str]:
        rows = await self.db.fetchall(
            "SELECT id FROM sessions WHERE host_id = %s AND state <> 'stopped' "
            "AND last_active_at < now() - make_interval(secs => %s)", (host_id, idle_s))
        return [r["id"] for r in rows]

    # -- actions and audit -----------------------------------------------------------------

    async def record_action(self, *, session_id: str, team_id: str, actor: Principal,
                            action: dict[str, Any], receipt: d.ActionReceipt,
                            task_id: str | None) -> None:
        """Insert the action and its receipt, and touch the session (one statement)."""
        kind, ident = actor_of(actor)
        await self.db.execute(
            "WITH touched AS (UPDATE sessions SET last_active_at = now() WHERE id = %s) "
            "INSERT INTO actions (session_id, team_id, kind, status, action, receipt, task_id, "
            "  actor_type, actor_id) VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s)",
            (session_id, session_id, team_id, receipt.action_type, receipt.status, _json(action),
             _json(receipt), task_id, kind, ident))

    async def history(self, session_id: str, limit: int = HISTORY_LIMIT) -> list[d.HistoryEntry]:
        rows = await self.db.fetchall(
            "SELECT action, receipt, source FROM actions WHERE session_id = %s ORDER BY id DESC LIMIT %s",
            (session_id, limit))
        return [d.HistoryEntry(action=r["action"], receipt=msgspec.convert(r["receipt"], d.ActionReceipt),
                               source=r["source"]) for r in rows]

    async def audit(self, *, team_id: str, actor: Principal, event: str, session_id: str | None = None,
                    task_id: str | None = None, detail: dict[str, Any] | None = None) -> None:
        kind, ident = actor_of(actor)
        await self.db.execute(
            "INSERT INTO audit (team_id, actor_type, actor_id, event, session_id, task_id, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
            (team_id, kind, ident, event, session_id, task_id, _json(detail or {})))

    # -- tasks -------------------------------------------------------------------------------

    @staticmethod
    def _task(row: dict[str, Any]) -> d.Task:
        last = row["last_receipt"]
        return d.Task(id=row["id"], sessionId=row["session_id"], description=row["description"],
                      status=row["status"], createdAt=_iso(row["created_at"]),
                      updatedAt=_iso(row["updated_at"]), thoughtSummary=row["thought_summary"],
                      requireApproval=row["require_approval"],
                      lastReceipt=msgspec.convert(last, d.ActionReceipt) if last else None)

    async def insert_task(self, *, task_id: str, team_id: str, body: d.CreateTaskBody) -> d.Task:
        row = await self.db.fetchone(
            "INSERT INTO tasks (id, team_id, session_id, description, status, thought_summary, "
            "  require_approval) VALUES (%s, %s, %s, %s, 'pending', %s, %s) RETURNING *",
            (task_id, team_id, body.session_id, body.description, body.thought_summary,
             body.require_approval))
        assert row is not None
        return self._task(row)

    async def task(self, team_id: str, task_id: str) -> d.Task | None:
        row = await self.db.fetchone("SELECT * FROM tasks WHERE id = %s AND team_id = %s",
                                     (task_id, team_id))
        return self._task(row) if row else None

    async def tasks(self, team_id: str) -> list[d.Task]:
        rows = await self.db.fetchall("SELECT * FROM tasks WHERE team_id = %s ORDER BY created_at",
                                      (team_id,))
        return [self._task(r) for r in rows]

    async def set_task_status(self, task_id: str, old: str, new: str, *,
                              clear_receipt: bool = False) -> d.Task | None:
        """Move a task from ``old`` to ``new`` (guarded: None if it was not ``old`` any more)."""
        row = await self.db.fetchone(
            "UPDATE tasks SET status = %s, updated_at = now(), "
            "  last_receipt = CASE WHEN %s THEN NULL ELSE last_receipt END "
            "WHERE id = %s AND status = %s RETURNING *", (new, clear_receipt, task_id, old))
        return self._task(row) if row else None

    async def task_receipt(self, task_id: str, receipt: d.ActionReceipt) -> None:
        """The task's latest receipt; a pending task starts running with its first action."""
        await self.db.execute(
            "UPDATE tasks SET last_receipt = %s::jsonb, updated_at = now(), "
            "  status = CASE WHEN status = 'pending' THEN 'running' ELSE status END WHERE id = %s",
            (_json(receipt), task_id))
