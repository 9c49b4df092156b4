"""The runs service's SQL: runs, live sessions, their events and screenshots, memory (``0010_runs.sql``).

Every read is scoped to a team: another team's run, session or entry is not
found. A record is kept whole in ``record`` (jsonb) and rewritten on each
change; the columns beside it are what queries need.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dovecote.bus.messages import runs as r
from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Database


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def iso(value: Any) -> str:
    return str(value.isoformat().replace("+00:00", "Z"))


def _event(row: dict[str, Any]) -> r.Event:
    subject = row["subject_id"]
    return r.Event(
        id=int(row["id"]),
        at=iso(row["at"]),
        type=row["type"],
        level=row["level"],
        message=row["message"],
        payload=row["payload"] or {},
        runId=subject if row["kind"] == "run" else None,
        sessionId=subject if row["kind"] == "live" else None,
    )


class RunStore:
    """SQL of the runs service."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- runs -----------------------------------------------------------------------------

    async def insert_run(self, record: r.RunRecord, team_id: str, actor: Principal) -> None:
        await self.db.execute(
            "INSERT INTO runs (id, team_id, status, actor, record) VALUES (%s, %s, %s, %s::jsonb, %s::jsonb)",
            (record.id, team_id, record.status, _json(actor), _json(record)),
        )

    async def save_run(self, record: r.RunRecord) -> None:
        await self.db.execute(
            "UPDATE runs SET status = %s, record = %s::jsonb, updated_at = now() WHERE id = %s",
            (record.status, _json(record), record.id),
        )

    async def run(self, team_id: str, run_id: str) -> r.RunRecord | None:
        row = await self.db.fetchone(
            "SELECT record FROM runs WHERE id = %s AND team_id = %s", (run_id, team_id)
        )
        return None if row is None else msgspec.convert(row["record"], r.RunRecord)

    async def runs(self, team_id: str) -> list[r.RunRecord]:
        rows = await self.db.fetchall(
            "SELECT record FROM runs WHERE team_id = %s ORDER BY created_at DESC, id DESC", (team_id,)
        )
        return [msgspec.convert(row["record"], r.RunRecord) for row in rows]

    async def unfinished_runs(self) -> list[r.RunRecord]:
        rows = await self.db.fetchall(
            "SELECT record FROM runs WHERE status NOT IN ('Succeeded', 'Failed', 'Blocked', 'Stopped')"
        )
        return [msgspec.convert(row["record"], r.RunRecord) for row in rows]

    async def delete_run(self, team_id: str, run_id: str) -> bool:
        count = await self.db.execute("DELETE FROM runs WHERE id = %s AND team_id = %s", (run_id, team_id))
        if count:
            await self.db.execute("DELETE FROM events WHERE subject_id = %s", (run_id,))
            await self.db.execute("DELETE FROM screenshots WHERE subject_id = %s", (run_id,))
        return bool(count)

    # -- live sessions ----------------------------------------------------------------------

    async def insert_live(self, record: r.LiveSession, team_id: str, actor: Principal) -> None:
        await self.db.execute(
            "INSERT INTO live_sessions (id, team_id, status, actor, record) "
            "VALUES (%s, %s, %s, %s::jsonb, %s::jsonb)",
            (record.id, team_id, record.status, _json(actor), _json(record)),
        )

    async def save_live(self, record: r.LiveSession) -> None:
        await self.db.execute(
            "UPDATE live_sessions SET status = %s, record = %s::jsonb, updated_at = now() WHERE id = %s",
            (record.status, _json(record), record.id),
        )

    async def live(self, team_id: str, session_id: str) -> r.LiveSession | None:
        row = await self.db.fetchone(
            "SELECT record FROM live_sessions WHERE id = %s AND team_id = %s", (session_id, team_id)
        )
        return None if row is None else msgspec.convert(row["record"], r.LiveSession)

    async def lives(self, team_id: str) -> list[r.LiveSession]:
        rows = await self.db.fetchall(
            "SELECT record FROM live_sessions WHERE team_id = %s ORDER BY created_at DESC, id DESC",
            (team_id,),
        )
        return [msgspec.convert(row["record"], r.LiveSession) for row in rows]

    async def delete_live(self, team_id: str, session_id: str) -> bool:
        count = await self.db.execute(
            "DELETE FROM live_sessions WHERE id = %s AND team_id = %s", (session_id, team_id)
        )
        if count:
            await self.db.execute("DELETE FROM events WHERE subject_id = %s", (session_id,))
        return bool(count)

    # -- history -----------------------------------------------------------------------------

    async def history(self, team_id: str, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        union = (
            "SELECT id, 'run' AS type, record, created_at FROM runs WHERE team_id = %(t)s "
            "UNION ALL SELECT id, 'live-session', record, created_at FROM live_sessions "
            "WHERE team_id = %(t)s"
        )
        rows = await self.db.fetchall(
            f"SELECT u.*, EXISTS (SELECT 1 FROM events e WHERE e.subject_id = u.id "
            f"AND e.type IN ('tool_call', 'tool_result', 'computer_action')) AS tools "
            f"FROM ({union}) u ORDER BY created_at DESC, id DESC LIMIT %(l)s OFFSET %(o)s",
            {"t": team_id, "l": limit, "o": offset},
        )
        total = await self.db.fetchval(f"SELECT count(*) FROM ({union}) u", {"t": team_id})
        return rows, int(total)

    # -- events ------------------------------------------------------------------------------

    async def append(
        self,
        *,
        subject_id: str,
        kind: r.SubjectKind,
        team_id: str,
        type: str,
        level: str,
        message: str,
        payload: dict[str, Any],
    ) -> r.Event:
        row = await self.db.fetchone(
            "INSERT INTO events (subject_id, kind, team_id, type, level, message, payload) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb) RETURNING *",
            (subject_id, kind, team_id, type, level, message, _json(payload)),
        )
        assert row is not None
        return _event(row)

    async def events(self, team_id: str, subject_id: str, after: int = 0, limit: int = 1000) -> list[r.Event]:
        rows = await self.db.fetchall(
            "SELECT * FROM events WHERE subject_id = %s AND team_id = %s AND id > %s ORDER BY id LIMIT %s",
            (subject_id, team_id, after, limit),
        )
        return [_event(row) for row in rows]

    # -- screenshots -------------------------------------------------------------------------

    async def put_screenshot(self, subject_id: str, sha256: str, png: bytes, width: int, height: int) -> bool:
        """Store a screen once per content; True when it was new."""
        count = await self.db.execute(
            "INSERT INTO screenshots (subject_id, sha256, png, width, height) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (subject_id, sha256, png, width, height),
        )
        return bool(count)

    async def screenshots(self, subject_id: str) -> list[dict[str, Any]]:
        return await self.db.fetchall(
            "SELECT sha256, png, width, height, first_at FROM screenshots WHERE subject_id = %s "
            "ORDER BY first_at, sha256",
            (subject_id,),
        )

    # -- memory --------------------------------------------------------------------------------

    async def insert_memory(self, entry: r.MemoryEntry, team_id: str) -> None:
        await self.db.execute(
            "INSERT INTO memory (id, team_id, scope, app_context, category, content, tags, confidence) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s)",
            (
                entry.id,
                team_id,
                entry.scope,
                entry.appContext,
                entry.category,
                entry.content,
                _json(entry.tags),
                entry.confidence,
            ),
        )

    async def memory(
        self, team_id: str, *, scope: str | None = None, app: str | None = None, touch: bool = False
    ) -> list[r.MemoryEntry]:
        where = (
            "team_id = %(t)s AND (%(s)s::text IS NULL OR scope = %(s)s) "
            "AND (%(a)s::text IS NULL OR lower(app_context) = lower(%(a)s))"
        )
        params = {"t": team_id, "s": scope, "a": app}
        if touch:
            await self.db.execute(
                f"UPDATE memory SET access_count = access_count + 1, last_accessed_at = now() WHERE {where}",
                params,
            )
        rows = await self.db.fetchall(f"SELECT * FROM memory WHERE {where} ORDER BY created_at, id", params)
        return [memory_entry(row) for row in rows]

    async def touch_memory(self, team_id: str, entry_ids: list[str]) -> None:
        """Count one access of each entry (given to a planner)."""
        await self.db.execute(
            "UPDATE memory SET access_count = access_count + 1, last_accessed_at = now() "
            "WHERE team_id = %s AND id = ANY(%s)",
            (team_id, entry_ids),
        )

    async def delete_memory(self, team_id: str, entry_id: str) -> bool:
        return bool(
            await self.db.execute("DELETE FROM memory WHERE id = %s AND team_id = %s", (entry_id, team_id))
        )


def memory_entry(row: dict[str, Any]) -> r.MemoryEntry:
    return r.MemoryEntry(
        id=row["id"],
        createdAt=iso(row["created_at"]),
        updatedAt=iso(row["updated_at"]),
        category=row["category"],
        appContext=row["app_context"],
        scope=row["scope"],
        content=row["content"],
        accessCount=int(row["access_count"]),
        lastAccessedAt=iso(row["last_accessed_at"]) if row["last_accessed_at"] else None,
        tags=list(row["tags"] or []),
        confidence=float(row["confidence"]),
    )
