"""The metrics service's tables (``0010_samples.sql``) and the answers read from them.

:meth:`MetricsStore.record` stores a batch of 30-second capsule averages in
one transaction: the new rows of ``capsule_points`` (a bucket already stored
is skipped, so a batch retried after a lost reply counts once) are added to
their team's ``team_points`` bucket and ``daily_usage`` day. Upserts touch
their keys in sorted order, so two vmmgrs recording for one team never
deadlock.

Reads are scoped to a team unless the caller is a platform admin asking
through an admin route.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from dovecote.bus.messages.common import Principal
from dovecote.bus.messages.metrics import CAPSULE_RANGES, CapsulePoint, MetricPoint
from dovecote.libs.db import Connection, Database
from dovecote.services.metrics import series


class MetricsStore:
    """SQL of the metrics service."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writes ----------------------------------------------------------------

    async def record(self, host_id: str, interval_s: float, points: list[CapsulePoint]) -> int:
        """Store the points not stored yet; returns how many were new."""
        unique = list({(p.capsule_id, p.ts): p for p in points}.values())

        def work(conn: Connection) -> int:
            rows = conn.execute(
                "INSERT INTO capsule_points (capsule_id, ts, team_id, host_id, samples, cpu_pct, "
                "  mem_bytes, disk_bytes, vcpus, memory_mb) "
                "SELECT p.capsule_id, to_timestamp(p.ts), p.team_id, %(host)s, p.samples, p.cpu_pct, "
                "  p.mem_bytes, p.disk_bytes, p.vcpus, p.memory_mb "
                "FROM unnest(%(ids)s::text[], %(ts)s::bigint[], %(teams)s::text[], %(samples)s::int[], "
                "  %(cpu)s::float8[], %(mem)s::bigint[], %(disk)s::bigint[], %(vcpus)s::int[], "
                "  %(memory)s::int[]) "
                "  AS p(capsule_id, ts, team_id, samples, cpu_pct, mem_bytes, disk_bytes, vcpus, memory_mb) "
                "ON CONFLICT (capsule_id, ts) DO NOTHING "
                "RETURNING capsule_id, extract(epoch FROM ts)::bigint AS ts",
                {"host": host_id, "ids": [p.capsule_id for p in unique], "ts": [p.ts for p in unique],
                 "teams": [p.team_id for p in unique], "samples": [p.samples for p in unique],
                 "cpu": [p.cpu_pct for p in unique], "mem": [p.mem_bytes for p in unique],
                 "disk": [p.disk_bytes for p in unique], "vcpus": [p.vcpus for p in unique],
                 "memory": [p.memory_mb for p in unique]}).fetchall()
            stored = {(r["capsule_id"], int(r["ts"])) for r in rows}
            new = [p for p in unique if (p.capsule_id, p.ts) in stored]
            teams = sorted(series.team_totals(new).items())
            if teams:
                conn.execute(
                    "INSERT INTO team_points (team_id, ts, running_count, vcpus, memory_mb) "
                    "SELECT t.team_id, to_timestamp(t.ts), t.n, t.vcpus, t.memory_mb "
                    "FROM unnest(%s::text[], %s::bigint[], %s::int[], %s::int[], %s::int[]) "
                    "  AS t(team_id, ts, n, vcpus, memory_mb) "
                    "ON CONFLICT (team_id, ts) DO UPDATE SET "
                    "  running_count = team_points.running_count + excluded.running_count, "
                    "  vcpus = team_points.vcpus + excluded.vcpus, "
                    "  memory_mb = team_points.memory_mb + excluded.memory_mb",
                    ([k[0] for k, _ in teams], [k[1] for k, _ in teams], [v[0] for _, v in teams],
                     [v[1] for _, v in teams], [v[2] for _, v in teams]))
            usage = sorted(series.usage_totals(new, interval_s).items())
            if usage:
                conn.execute(
                    "INSERT INTO daily_usage (team_id, day, cpu_minutes, ram_mb_minutes) "
                    "SELECT * FROM unnest(%s::text[], %s::date[], %s::float8[], %s::float8[]) "
                    "ON CONFLICT (team_id, day) DO UPDATE SET "
                    "  cpu_minutes = daily_usage.cpu_minutes + excluded.cpu_minutes, "
                    "  ram_mb_minutes = daily_usage.ram_mb_minutes + excluded.ram_mb_minutes",
                    ([k[0] for k, _ in usage], [k[1] for k, _ in usage], [v[0] for _, v in usage],
                     [v[1] for _, v in usage]))
            return len(new)

        if not unique:
            return 0
        return await self.db.transaction(work)

    async def prune(self, *, points_hours: int, team_days: int, usage_days: int) -> dict[str, int]:
        """Delete what is older than the retention periods; returns the rows deleted per table."""
        return {
            "capsule_points": await self.db.execute(
                "DELETE FROM capsule_points WHERE ts < now() - make_interval(hours => %s)",
                (points_hours,)),
            "team_points": await self.db.execute(
                "DELETE FROM team_points WHERE ts < now() - make_interval(days => %s)", (team_days,)),
            "daily_usage": await self.db.execute(
                "DELETE FROM daily_usage WHERE day < current_date - %s::int", (usage_days,)),
        }

    async def forget_team(self, team_id: str) -> None:
        """Drop everything of a deleted team."""

        def work(conn: Connection) -> None:
            conn.execute("DELETE FROM capsule_points WHERE team_id = %s", (team_id,))
            conn.execute("DELETE FROM team_points WHERE team_id = %s", (team_id,))
            conn.execute("DELETE FROM daily_usage WHERE team_id = %s", (team_id,))

        await self.db.transaction(work)

    # -- reads -------------------------------------------------------------------

    async def capsule_points(self, actor: Principal, capsule_id: str, range_name: str, now: float, *,
                             admin: bool) -> tuple[bool, list[MetricPoint]]:
        """``(any points at all, the points of the range)`` of one capsule the caller may see."""
        window, width = CAPSULE_RANGES[range_name]
        scope = "" if admin else " AND team_id = %(team)s"
        params: dict[str, Any] = {"id": capsule_id, "team": actor.team_id}
        exists = await self.db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM capsule_points WHERE capsule_id = %(id)s" + scope + ")", params)
        if not exists:
            return False, []
        width = max(width, 30)  # the raw tier is not persisted: its range gets 30 s averages
        params.update(width=width, cutoff=now - window - width)
        rows = await self.db.fetchall(
            "SELECT (floor(extract(epoch FROM ts) / %(width)s) * %(width)s)::bigint AS t, "
            "  sum(cpu_pct * samples) / sum(samples) AS cpu_pct, "
            "  round(sum(mem_bytes::numeric * samples) / sum(samples))::bigint AS mem_bytes, "
            "  round(sum(disk_bytes::numeric * samples) / sum(samples))::bigint AS disk_bytes "
            "FROM capsule_points WHERE capsule_id = %(id)s" + scope +
            "  AND ts > to_timestamp(%(cutoff)s) GROUP BY 1 ORDER BY 1", params)
        return True, [MetricPoint(timestamp_unix=int(r["t"]), cpu_pct=round(float(r["cpu_pct"]), 3),
                                  mem_bytes=int(r["mem_bytes"]), disk_bytes=int(r["disk_bytes"]))
                      for r in rows]

    async def team_series(self, team_id: str, first: int, width: int) -> dict[int, tuple[int, int, int]]:
        """``{bucket: (running, vcpus, memory_mb)}``, the maximum of each bucket from ``first``."""
        rows = await self.db.fetchall(
            "SELECT (floor(extract(epoch FROM ts) / %(w)s) * %(w)s)::bigint AS bucket, "
            "  max(running_count) AS running, max(vcpus) AS vcpus, max(memory_mb) AS memory "
            "FROM team_points WHERE team_id = %(team)s AND ts >= to_timestamp(%(first)s) "
            "GROUP BY 1", {"w": width, "team": team_id, "first": first})
        return {int(r["bucket"]): (int(r["running"]), int(r["vcpus"]), int(r["memory"])) for r in rows}

    async def team_peaks(self, team_id: str, since: float) -> tuple[int, int, int]:
        """The highest running count, vCPUs and memory since ``since`` (unix seconds)."""
        row = await self.db.fetchone(
            "SELECT coalesce(max(running_count), 0) AS running, coalesce(max(vcpus), 0) AS vcpus, "
            "  coalesce(max(memory_mb), 0) AS memory FROM team_points "
            "WHERE team_id = %s AND ts > to_timestamp(%s)", (team_id, since))
        assert row is not None
        return int(row["running"]), int(row["vcpus"]), int(row["memory"])

    async def team_usage(self, team_id: str, first: date, last: date) -> dict[date, tuple[float, float]]:
        rows = await self.db.fetchall(
            "SELECT day, cpu_minutes, ram_mb_minutes FROM daily_usage "
            "WHERE team_id = %s AND day BETWEEN %s AND %s", (team_id, first, last))
        return {_day(r["day"]): (float(r["cpu_minutes"]), float(r["ram_mb_minutes"])) for r in rows}


def _day(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value
