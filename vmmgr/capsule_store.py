"""The ``capsules`` table: the one module that speaks SQL to it.

Every read and write of a capsule record goes through :class:`CapsuleStore`;
the other vmmgr modules ask it questions by name (``idle_past_timeout``,
``paused_for``...) instead of writing their own SQL. Statuses are
:class:`Status` members (a :class:`~enum.StrEnum`, so a row's ``status``
text compares equal to them).

A status changes only through :meth:`CapsuleStore.set_status`: one guarded
``UPDATE`` (the move happens when the current status is one of
``only_from``) that also keeps the timestamps, the error and the pause
reason right. Publishing the change is the caller's
(:meth:`dovecote.vmmgr.capsules.Capsules.set_status`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any

from dovecote.bus.messages import capsules as m
from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Connection, Database
from dovecote.libs.errors import ServiceError
from dovecote.libs.timefmt import rfc3339
from dovecote.vmmgr import placement

Row = dict[str, Any]
Stage = Callable[[Connection, Row], None]
"""Run in a write's transaction with the written row (vmmgr stages the change's events)."""


class Status(StrEnum):
    """Every status of a capsule record (the reference's ``Capsule.status``)."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    STOPPING = "stopping"
    HIBERNATED = "hibernated"
    STOPPED = "stopped"
    MISSING = "missing"
    ERROR = "error"


assert tuple(Status) == tuple(m.STATUSES), "Status and the message schema disagree"

FINAL_STATUSES = (Status.STOPPED, Status.MISSING, Status.ERROR)
"""A record whose VM is gone for good."""
LIVE_STATUSES = tuple(Status(s) for s in placement.LIVE_STATUSES)
"""A VM runs or is on its way (what counts against the caps)."""
ON_HOST = (*LIVE_STATUSES, Status.PAUSED, Status.HIBERNATED)
"""Statuses of a capsule whose VM or saved state is on its host."""
IN_TRANSITION = (Status.STARTING, Status.PAUSING, Status.RESUMING, Status.STOPPING)

SHUTDOWN_PAUSE = "shutdown"
"""The ``pause_reason`` of a capsule paused because vmmgr stopped (see :mod:`~dovecote.vmmgr.shutdown`)."""

NOT_FOUND = ServiceError(404, "not_found", "capsule not found")

_USAGE = ("SELECT count(*) AS n, coalesce(sum(vcpus), 0) AS vcpus, "
          "coalesce(sum(memory_mb), 0) AS memory FROM capsules ")


def _texts(statuses: Iterable[str]) -> list[str]:
    return [str(s) for s in statuses]


def _usage(row: Row | None) -> placement.Usage:
    assert row is not None
    return placement.Usage(capsules=int(row["n"]), vcpus=int(row["vcpus"]), memory_mb=int(row["memory"]))


def to_capsule(row: Row) -> m.Capsule:
    """The API's ``Capsule`` of a ``capsules`` row."""
    metadata = row.get("metadata") or {}
    return m.Capsule(
        id=row["id"], status=row["status"], template=row["template"], vcpus=row["vcpus"],
        memory_mb=row["memory_mb"], timeout_sec=row["timeout_sec"], guest_ip=row["guest_ip"],
        host_ip="", created_at=rfc3339(row["created_at"]) or "", started_at=rfc3339(row["started_at"]),
        last_active_at=rfc3339(row["last_active_at"]), last_updated=rfc3339(row["updated_at"]) or "",
        metadata={str(k): str(v) for k, v in metadata.items()} or None,
        disk_size_mb=row["disk_size_mb"], disk_used_mb=row.get("disk_used_mb"),
        host_unreachable_since=rfc3339(row.get("host_unreachable_since")))


def reply_of(row: Row) -> m.CapsuleReply:
    return m.CapsuleReply(capsule=to_capsule(row), host_id=row["host_id"], team_id=row["team_id"])


def row_of(reply: m.CapsuleReply) -> Row:
    """The columns of a capsule's row that a :class:`CapsuleReply` carries: ``id``,
    ``status``, ``host_id`` and ``team_id`` (what the agent operations look at)."""
    return {"id": reply.capsule.id, "status": reply.capsule.status, "host_id": reply.host_id,
            "team_id": reply.team_id}


def require_local(row: Row, host_id: str) -> None:
    """Refuse (503 ``wrong_host``) an operation on a capsule of another host."""
    if row["host_id"] != host_id:
        raise ServiceError(503, "wrong_host",
                           f"capsule {row['id']} runs on host {row['host_id']}, not {host_id}")


class CapsuleStore:
    """The ``capsules`` records of one installation (every host shares the table)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reads -------------------------------------------------------------------

    async def get(self, capsule_id: str) -> Row | None:
        return await self.db.fetchone("SELECT * FROM capsules WHERE id = %s", (capsule_id,))

    async def find(self, actor: Principal, capsule_id: str, admin: bool) -> Row:
        """The capsule's row if the caller may see it, else 404 (never 403: no probing)."""
        if admin and not actor.is_admin:
            raise ServiceError(403, "forbidden", "platform admin access required")
        if not capsule_id or len(capsule_id) > 64:
            raise NOT_FOUND
        row = await self.get(capsule_id)
        if row is None or (not admin and row["team_id"] != actor.team_id):
            raise NOT_FOUND
        return row

    async def newest(self, team_id: str | None, *, limit: int = 1000) -> list[Row]:
        """The newest capsules of ``team_id`` (None: of every team)."""
        if team_id is None:
            return await self.db.fetchall(
                "SELECT * FROM capsules ORDER BY created_at DESC LIMIT %s", (limit,))
        return await self.db.fetchall(
            "SELECT * FROM capsules WHERE team_id = %s ORDER BY created_at DESC LIMIT %s",
            (team_id, limit))

    async def on_host(self, host_id: str, *, statuses: Iterable[str] | None = None,
                      excluding: Iterable[str] | None = None, team_id: str | None = None) -> list[Row]:
        """``id`` and ``status`` of the capsules of ``host_id`` (oldest first), filtered."""
        return await self.db.fetchall(
            "SELECT id, status FROM capsules WHERE host_id = %s "
            "AND (%s::text[] IS NULL OR status = ANY(%s::text[])) "
            "AND (%s::text[] IS NULL OR status <> ALL(%s::text[])) "
            "AND (%s::text IS NULL OR team_id = %s) ORDER BY created_at",
            (host_id, *[_texts(statuses) if statuses is not None else None] * 2,
             *[_texts(excluding) if excluding is not None else None] * 2, team_id, team_id))

    async def ids_on_host(self, host_id: str, *, statuses: Iterable[str] | None = None,
                          excluding: Iterable[str] | None = None, team_id: str | None = None) -> list[str]:
        rows = await self.on_host(host_id, statuses=statuses, excluding=excluding, team_id=team_id)
        return [r["id"] for r in rows]

    async def live_on_host(self, host_id: str) -> list[Row]:
        """What the sampler follows: the capsules of ``host_id`` not in a final status."""
        return await self.db.fetchall(
            "SELECT id, team_id, vcpus, memory_mb, status, started_at FROM capsules "
            "WHERE host_id = %s AND NOT (status = ANY(%s))", (host_id, _texts(FINAL_STATUSES)))

    async def count_by_status(self, host_id: str) -> dict[str, int]:
        rows = await self.db.fetchall(
            "SELECT status, count(*) AS n FROM capsules WHERE host_id = %s GROUP BY status", (host_id,))
        return {r["status"]: int(r["n"]) for r in rows}

    async def paused_for(self, host_id: str, reason: str) -> list[str]:
        """The capsules of ``host_id`` paused with ``pause_reason`` (oldest change first)."""
        rows = await self.db.fetchall(
            "SELECT id FROM capsules WHERE host_id = %s AND status = %s AND pause_reason = %s "
            "ORDER BY updated_at", (host_id, str(Status.PAUSED), reason))
        return [r["id"] for r in rows]

    async def idle_past_timeout(self, host_id: str) -> list[str]:
        """Running capsules of ``host_id`` idle for longer than their ``timeout_sec``."""
        rows = await self.db.fetchall(
            "SELECT id FROM capsules WHERE host_id = %s AND status = %s "
            "AND timeout_sec > 0 AND coalesce(last_active_at, started_at, created_at) "
            "  < now() - make_interval(secs => timeout_sec)", (host_id, str(Status.RUNNING)))
        return [r["id"] for r in rows]

    async def count_from_template(self, team_id: str, template: str) -> int:
        """The team's capsules made from ``template`` that still exist."""
        return int(await self.db.fetchval(
            "SELECT count(*) FROM capsules WHERE team_id = %s AND template = %s "
            "AND NOT (status = ANY(%s))", (team_id, template, _texts(FINAL_STATUSES))) or 0)

    async def for_reconcile(self, host_id: str, vm_ids: list[str]) -> list[Row]:
        """The records a reconcile of ``host_id`` judges: those of the VMs found, the live
        ones of the host, and its ``missing`` ones that went missing while it was silent."""
        return await self.db.fetchall(
            "SELECT * FROM capsules WHERE id = ANY(%s) OR (host_id = %s AND status = ANY(%s)) "
            "OR (host_id = %s AND status = %s AND host_unreachable_since IS NOT NULL)",
            (vm_ids, host_id, _texts(LIVE_STATUSES), host_id, str(Status.MISSING)))

    async def usage_by_host(self) -> dict[str, placement.Usage]:
        """What the live capsules of each host hold (for placement)."""
        rows = await self.db.fetchall(
            "SELECT host_id, count(*) AS n, coalesce(sum(vcpus), 0) AS vcpus, "
            "coalesce(sum(memory_mb), 0) AS memory FROM capsules WHERE status = ANY(%s) "
            "GROUP BY host_id", (_texts(LIVE_STATUSES),))
        return {r["host_id"]: _usage(r) for r in rows}

    async def team_usage(self, team_id: str) -> placement.Usage:
        """What the team's live capsules (those that count against its caps) hold now."""
        return _usage(await self.db.fetchone(_USAGE + "WHERE team_id = %s AND status = ANY(%s)",
                                             (team_id, _texts(LIVE_STATUSES))))

    # -- writes --------------------------------------------------------------------

    async def insert(self, *, capsule_id: str, team_id: str, created_by: str, host_id: str,
                     spec: m.CapsuleSpec,
                     check: Callable[[placement.Usage, Callable[[], placement.Usage]], None],
                     stage: Stage | None = None) -> Row:
        """Insert a ``starting`` record once ``check(team usage, host usage)`` accepts it.

        The check runs under a per-team advisory lock, in the insert's transaction,
        so two creates of one team never both pass the caps; ``stage`` runs in it
        with the new row.
        """

        def work(conn: Connection) -> Row:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('vmmgr.team:' || %s))", (team_id,))
            live = _texts(LIVE_STATUSES)
            team = _usage(conn.execute(_USAGE + "WHERE team_id = %s AND status = ANY(%s)",
                                       (team_id, live)).fetchone())
            check(team, lambda: _usage(conn.execute(_USAGE + "WHERE host_id = %s AND status = ANY(%s)",
                                                    (host_id, live)).fetchone()))
            row = conn.execute(
                "INSERT INTO capsules (id, team_id, created_by, host_id, template, vcpus, memory_mb, "
                "disk_size_mb, timeout_sec, status, metadata) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb) RETURNING *",
                (capsule_id, team_id, created_by, host_id, spec.template, spec.vcpus, spec.memory_mb,
                 spec.disk_size_mb, spec.timeout_sec, str(Status.STARTING),
                 json.dumps(spec.metadata or {}))).fetchone()
            assert row is not None
            if stage is not None:
                stage(conn, dict(row))
            return dict(row)

        return await self.db.transaction(work)

    async def set_status(self, capsule_id: str, new: Status, *, only_from: Iterable[str] | None = None,
                         error: str | None = None, metadata: dict[str, str] | None = None,
                         pause_reason: str | None = None, disk: tuple[int, int] | None = None,
                         stage: Stage | None = None) -> Row | None:
        """Move a capsule to ``new`` if its status is one of ``only_from`` (None: any).

        A move to ``pausing`` records ``pause_reason`` (``user``, ``ttl_expired``,
        ``shutdown``), kept while the capsule is paused; ``disk`` (size, used in MiB,
        see :mod:`dovecote.vmmgr.disks`) is stored in the same statement. ``stage``
        runs in the update's transaction with the updated row. Returns the updated
        row with its ``old_status``, or None when the guard did not match.
        """
        query = (
            "WITH old AS (SELECT id, status FROM capsules WHERE id = %(id)s FOR UPDATE) "
            "UPDATE capsules c SET status = %(new)s, updated_at = now(), "
            "  error = CASE WHEN %(error)s::text IS NOT NULL THEN %(error)s::text "
            "               WHEN %(new)s IN ('running', 'paused') THEN NULL ELSE c.error END, "
            "  metadata = c.metadata || %(meta)s::jsonb, "
            "  disk_size_mb = coalesce(%(disk_size)s::int, c.disk_size_mb), "
            "  disk_used_mb = coalesce(%(disk_used)s::int, c.disk_used_mb), "
            "  pause_reason = CASE WHEN %(new)s = 'pausing' THEN %(reason)s::text "
            "                      ELSE c.pause_reason END, "
            "  started_at = CASE WHEN %(new)s = 'running' THEN coalesce(c.started_at, now()) "
            "                    ELSE c.started_at END, "
            "  last_active_at = CASE WHEN %(new)s = 'running' AND old.status <> 'running' "
            "                        THEN now() ELSE c.last_active_at END, "
            "  stopped_at = CASE WHEN %(new)s IN ('stopped', 'missing', 'error') THEN now() "
            "                    ELSE c.stopped_at END "
            "FROM old WHERE c.id = old.id "
            "  AND (%(from)s::text[] IS NULL OR old.status = ANY(%(from)s::text[])) "
            "RETURNING c.*, old.status AS old_status")
        params = {"id": capsule_id, "new": str(Status(new)), "error": error,
                  "meta": json.dumps(metadata or {}), "reason": pause_reason,
                  "disk_size": disk[0] if disk else None, "disk_used": disk[1] if disk else None,
                  "from": _texts(only_from) if only_from is not None else None}
        if stage is None:
            return await self.db.fetchone(query, params)

        def work(conn: Connection) -> Row | None:
            found = conn.execute(query, params).fetchone()
            if found is None:
                return None
            row = dict(found)
            stage(conn, row)
            return row

        return await self.db.transaction(work)

    async def touch(self, capsule_id: str) -> None:
        """The capsule was used now (its idle timeout starts again)."""
        await self.db.execute("UPDATE capsules SET last_active_at = now() WHERE id = %s", (capsule_id,))

    async def set_disk(self, capsule_id: str, size_mb: int, used_mb: int) -> None:
        await self.db.execute("UPDATE capsules SET disk_size_mb = %s, disk_used_mb = %s WHERE id = %s",
                              (size_mb, used_mb, capsule_id))

    # -- hosts that go quiet -------------------------------------------------------

    async def mark_host_unreachable(self, host_id: str) -> list[str]:
        """A host went silent: its capsules on it keep their status, marked unreachable."""
        rows = await self.db.fetchall(
            "UPDATE capsules SET host_unreachable_since = now(), updated_at = now() "
            "WHERE host_id = %s AND status = ANY(%s) AND host_unreachable_since IS NULL RETURNING id",
            (host_id, _texts(ON_HOST)))
        return [r["id"] for r in rows]

    async def mark_host_reachable(self, host_id: str, *, every_status: bool = False) -> list[str]:
        """A host answers again: its capsules are reachable (``every_status``: the
        ``missing`` ones too, which otherwise keep the marker for its reconcile)."""
        rows = await self.db.fetchall(
            "UPDATE capsules SET host_unreachable_since = NULL, updated_at = now() "
            "WHERE host_id = %s AND (%s OR status = ANY(%s)) AND host_unreachable_since IS NOT NULL "
            "RETURNING id", (host_id, every_status, _texts(ON_HOST)))
        return [r["id"] for r in rows]

    async def silent_for(self, seconds: float) -> list[str]:
        """Capsules on a host silent for longer than ``seconds``."""
        rows = await self.db.fetchall(
            "SELECT id FROM capsules WHERE status = ANY(%s) "
            "AND host_unreachable_since < now() - make_interval(secs => %s)",
            (_texts(ON_HOST), seconds))
        return [r["id"] for r in rows]
