"""The browsers service's SQL: sessions, their action log, captures and artifacts.

One store for the service's tables (``0010_sessions.sql``). Every read that
serves a user is scoped to a team: another team's session is not found.
Status changes follow :mod:`.status` and are guarded by the current status.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dovecote.bus.messages import browsers as b
from dovecote.libs.db import Database
from dovecote.services.browsers.status import allowed


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def iso(value: Any) -> str | None:
    if value is None:
        return None
    text: str = value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return text


class BrowserStore:
    """SQL of the browsers service."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, *, session_id: str, team_id: str, host_id: str, machine_id: str,
                     provider: str, body: b.CreateBody) -> None:
        await self.db.execute(
            "INSERT INTO sessions (id, team_id, host_id, machine_id, provider, status, initial_prompt, "
            "  viewport, recording, status_history) "
            "VALUES (%s, %s, %s, %s, %s, 'creating', %s, %s::jsonb, %s, "
            "  jsonb_build_array(jsonb_build_object('status', 'creating', 'at', "
            "    to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))))",
            (session_id, team_id, host_id, machine_id, provider, body.initialPrompt,
             _json(body.options.viewport), body.options.recording))

    async def transition(self, session_id: str, current: str, target: str, *,
                         error_code: str | None = None, error_message: str | None = None) -> bool:
        """``current → target`` if the session is still ``current``; False otherwise."""
        if not allowed(current, target):
            return False
        changed = await self.db.execute(
            "UPDATE sessions SET status = %(target)s, "
            "  started_at = CASE WHEN %(target)s = 'running' THEN now() ELSE started_at END, "
            "  ended_at = CASE WHEN %(target)s IN ('completed', 'failed', 'cancelled') "
            "    THEN now() ELSE ended_at END, "
            "  error_code = coalesce(%(code)s, error_code), "
            "  error_message = coalesce(%(message)s, error_message), "
            "  status_history = status_history || jsonb_build_array(jsonb_build_object("
            "    'status', %(target)s::text, 'at', "
            "    to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))) "
            "WHERE id = %(id)s AND status = %(current)s",
            {"target": target, "current": current, "id": session_id, "code": error_code,
             "message": error_message})
        return changed == 1

    async def row(self, session_id: str, team_id: str | None = None) -> dict[str, Any] | None:
        return await self.db.fetchone(
            "SELECT *, (SELECT count(*) FROM actions a WHERE a.session_id = s.id) AS action_count, "
            "  (SELECT count(*) FROM artifacts r WHERE r.session_id = s.id AND r.type = 'screenshot') "
            "    AS screenshot_count, "
            "  (extract(epoch FROM coalesce(ended_at, now()) - created_at) * 1000)::bigint AS duration_ms "
            "FROM sessions s WHERE id = %s AND (%s::text IS NULL OR team_id = %s)",
            (session_id, team_id, team_id))

    async def page(self, team_id: str, query: b.ListQuery) -> tuple[list[dict[str, Any]], int]:
        where = "team_id = %(team)s" + ("" if query.includeTerminated
                                         else " AND status IN ('creating', 'running')")
        total = int(await self.db.fetchval(f"SELECT count(*) FROM sessions WHERE {where}",
                                           {"team": team_id}))
        rows = await self.db.fetchall(
            f"SELECT id, status, current_url, created_at, jsonb_array_length(navigations) AS nav_count "
            f"FROM sessions WHERE {where} ORDER BY created_at DESC, id LIMIT %(limit)s OFFSET %(offset)s",
            {"team": team_id, "limit": query.limit, "offset": query.offset})
        return rows, total

    async def live(self, host_id: str | None = None) -> list[dict[str, Any]]:
        return await self.db.fetchall(
            "SELECT id, status, team_id, provider, machine_id FROM sessions "
            "WHERE status IN ('creating', 'running') "
            "AND (%(host)s::text IS NULL OR host_id = %(host)s)", {"host": host_id})

    async def count_live(self, team_id: str) -> int:
        return int(await self.db.fetchval(
            "SELECT count(*) FROM sessions WHERE team_id = %s AND status IN ('creating', 'running') "
            "AND provider = 'host'", (team_id,)))

    async def set_machine(self, session_id: str, machine_id: str) -> None:
        """The session's ``machineId`` once its capsule exists (a VM session made after its template)."""
        await self.db.execute("UPDATE sessions SET machine_id = %s WHERE id = %s", (machine_id, session_id))

    async def set_page(self, session_id: str, url: str | None, title: str | None) -> None:
        await self.db.execute(
            "UPDATE sessions SET current_url = coalesce(%s, current_url), title = coalesce(%s, title) "
            "WHERE id = %s", (url, title, session_id))

    async def add_navigation(self, session_id: str, nav: b.Navigation) -> None:
        await self.db.execute(
            "UPDATE sessions SET current_url = %s, navigations = navigations || jsonb_build_array(%s::jsonb) "
            "WHERE id = %s", (nav.url, _json(nav), session_id))

    async def touch(self, session_id: str) -> None:
        await self.db.execute("UPDATE sessions SET last_active_at = now() WHERE id = %s", (session_id,))

    async def idle(self, idle_s: float) -> list[str]:
        rows = await self.db.fetchall(
            "SELECT id FROM sessions WHERE status = 'running' "
            "AND last_active_at < now() - make_interval(secs => %s)", (idle_s,))
        return [r["id"] for r in rows]

    # -- actions ------------------------------------------------------------------

    async def add_actions(self, session_id: str, actions: list[b.Action]) -> None:
        """Append actions in order (one transaction for a burst)."""

        def insert(conn: Any) -> None:
            for action in actions:
                conn.execute(
                    "INSERT INTO actions (session_id, seq, type, at, success, details, duration_ms, tokens, "
                    "  price, source) "
                    "SELECT %s, coalesce(max(seq), 0) + 1, %s, %s::timestamptz, %s, %s::jsonb, %s, %s, %s, "
                    "  %s FROM actions WHERE session_id = %s",
                    (session_id, action.type, action.timestamp, action.success, _json(action.details),
                     action.duration, action.cost.tokens, action.cost.price, action.source, session_id))

        await self.db.transaction(insert)

    async def actions(self, session_id: str, offset: int, limit: int) -> tuple[list[b.Action], int]:
        total = int(await self.db.fetchval("SELECT count(*) FROM actions WHERE session_id = %s",
                                           (session_id,)))
        rows = await self.db.fetchall(
            "SELECT * FROM actions WHERE session_id = %s ORDER BY seq LIMIT %s OFFSET %s",
            (session_id, limit, offset))
        return [b.Action(type=r["type"], timestamp=iso(r["at"]) or "", success=r["success"],
                         details=r["details"], duration=r["duration_ms"],
                         cost=b.Cost(tokens=r["tokens"], price=r["price"]), source=r["source"])
                for r in rows], total

    # -- captures and artifacts ------------------------------------------------------

    async def save_captures(self, session_id: str, console: list[b.ConsoleEntry],
                            network: list[b.NetworkEntry]) -> None:
        await self.db.execute(
            "INSERT INTO captures (session_id, console, network) VALUES (%s, %s::jsonb, %s::jsonb) "
            "ON CONFLICT (session_id) DO UPDATE SET console = excluded.console, network = excluded.network",
            (session_id, _json(console), _json(network)))

    async def captures(self, session_id: str) -> tuple[list[b.ConsoleEntry], list[b.NetworkEntry]]:
        row = await self.db.fetchone("SELECT console, network FROM captures WHERE session_id = %s",
                                     (session_id,))
        if row is None:
            return [], []
        return (msgspec.convert(row["console"], list[b.ConsoleEntry]),
                msgspec.convert(row["network"], list[b.NetworkEntry]))

    async def add_artifact(self, *, object_id: str, session_id: str, kind: str, key: str,
                           at: str) -> None:
        await self.db.execute(
            "INSERT INTO artifacts (object_id, session_id, type, storage_key, at) "
            "VALUES (%s, %s, %s, %s, %s::timestamptz)", (object_id, session_id, kind, key, at))

    async def artifacts(self, session_id: str) -> list[dict[str, Any]]:
        return await self.db.fetchall(
            "SELECT * FROM artifacts WHERE session_id = %s ORDER BY at, object_id", (session_id,))
