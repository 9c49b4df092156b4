"""The two hot lease statements: claim-next, and a lease change by its holder.

An agent's work loop is ``claim-next`` then ``heartbeat``… ``complete``; each
of these is one SQL statement here, run in autocommit (so one round trip to
PostgreSQL and one commit), instead of a transaction of five or six
statements:

* :data:`CLAIM` counts the session's live leases, picks the best queued run
  it may work on (priority, then age) with ``FOR UPDATE SKIP LOCKED`` (so
  concurrent claimers skip each other's rows and a run is claimed once),
  claims it with a new token hash, marks its task ``in_progress``, writes the
  audit entry, and answers one row: ``held`` (the live leases before this
  claim; at the limit nothing is claimed), the run's columns, its task's
  (prefixed ``task__``) and its channel's (prefixed ``chan__``). With no
  claimable run the run columns are NULL.
* :data:`CHANGES` (one statement per outcome) is the holder's common case of :func:`.lease.decide`:
  the ``UPDATE`` matches only a run ``claimed`` by the caller whose lease has
  not ended (PostgreSQL re-checks those conditions on the locked row, which
  is the fence: a lease taken over meanwhile is not touched), updates its
  task when the run ends, writes the audit entry, and answers the run's
  columns and its channel's. No row means "not the holder's live lease":
  the caller then decides on the locked row the slow way, to answer the
  precise 409 (or to act, if the lease changed hands to it meanwhile).
"""

from __future__ import annotations

from typing import Any

TASK_COLUMNS = (
    "id",
    "team_id",
    "workspace_id",
    "identifier",
    "title",
    "description",
    "priority",
    "status",
    "network_channel",
    "required_capabilities",
    "owner_kind",
    "owner_ref",
    "created_at",
    "updated_at",
)
CHANNEL_COLUMNS = (
    "id",
    "team_id",
    "workspace_id",
    "channel",
    "display_name",
    "purpose",
    "task_id",
    "run_id",
    "allowed_message_kinds",
    "last_seq",
    "last_activity_at",
    "created_at",
)


def _prefixed(alias: str, prefix: str, columns: tuple[str, ...]) -> str:
    return ", ".join(f"{alias}.{c} AS {prefix}{c}" for c in columns)


def split(row: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The columns of ``row`` named ``<prefix><column>``, without the prefix."""
    n = len(prefix)
    return {k[n:]: v for k, v in row.items() if k.startswith(prefix)}


_AUDIT_INSERT = (
    "INSERT INTO audit_log (team_id, actor_kind, actor_id, action, resource_type, resource_id, metadata)"
)

CLAIM = (
    "WITH held AS ("
    "  SELECT count(*) AS n FROM runs"
    "  WHERE session_id = %(sid)s AND status = 'claimed' AND lease_until > %(now)s"
    "), next AS ("
    "  SELECT id FROM runs"
    "  WHERE workspace_id = %(ws)s AND team_id = %(team)s AND status = 'queued'"
    "    AND required_capabilities <@ %(caps)s::text[]"
    "    AND (network_channel = '' OR %(any_net)s OR network_channel = ANY(%(nets)s::text[]))"
    "    AND (SELECT n FROM held) < %(limit)s"
    "  ORDER BY priority_rank DESC, queued_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
    "), claimed AS ("
    "  UPDATE runs r SET status = 'claimed', session_id = %(sid)s, claim_token_hash = %(hash)s,"
    "    claimed_at = %(now)s, heartbeat_at = %(now)s, lease_until = %(until)s,"
    "    started_at = coalesce(r.started_at, %(now)s)"
    "  FROM next WHERE r.id = next.id RETURNING r.*"
    "), task AS ("
    "  UPDATE tasks t SET status = 'in_progress', updated_at = now()"
    "  FROM claimed WHERE t.id = claimed.task_id RETURNING t.*"
    "), audited AS ("
    f"  {_AUDIT_INSERT}"
    "  SELECT %(team)s, 'agent_session', %(sid)s, 'run.claim', 'run', claimed.id,"
    "    jsonb_build_object('attempt', claimed.attempt, 'lease_seconds', %(seconds)s::float8)"
    "  FROM claimed"
    ") "
    "SELECT held.n AS held, claimed.*, "
    + _prefixed("task", "task__", TASK_COLUMNS)
    + ", "
    + _prefixed("ch", "chan__", CHANNEL_COLUMNS)
    + " FROM held LEFT JOIN (claimed JOIN task ON task.id = claimed.task_id"
    "  JOIN channels ch ON ch.id = claimed.coordination_channel_id) ON true"
)

_SETS = {
    "claimed": "heartbeat_at = %(now)s, lease_until = %(until)s",
    "completed": "status = 'completed', ended_at = %(now)s, result = %(result)s",
    "failed": "status = 'failed', ended_at = %(now)s, error = %(error)s, failure_kind = 'agent_reported'",
    "queued": (
        "status = 'queued', session_id = NULL, claim_token_hash = NULL, lease_until = NULL, "
        "claimed_at = NULL, heartbeat_at = NULL"
    ),
}


def _change(outcome: str) -> str:
    return (
        "WITH upd AS ("
        f"  UPDATE runs SET {_SETS[outcome]}"
        "  WHERE id = %(id)s AND team_id = %(team)s AND workspace_id = %(ws)s"
        "    AND status = 'claimed' AND session_id = %(sid)s AND lease_until > %(now)s"
        "  RETURNING *"
        "), task AS ("
        "  UPDATE tasks t SET status = %(task_status)s, updated_at = now()"
        "  FROM upd WHERE t.id = upd.task_id AND %(task_status)s <> ''"
        "), audited AS ("
        f"  {_AUDIT_INSERT}"
        "  SELECT %(team)s, 'agent_session', %(sid)s, %(action)s, 'run', upd.id, %(audit)s FROM upd"
        ") "
        "SELECT upd.*, " + _prefixed("ch", "chan__", CHANNEL_COLUMNS) + " FROM upd"
        " JOIN channels ch ON ch.id = upd.coordination_channel_id"
    )


CHANGES = {outcome: _change(outcome) for outcome in _SETS}
"""The holder's lease change, by the outcome :func:`.lease.decide` gives its action."""
