"""The audit log: one row per state-changing action, success or failure.

Writers pass the connection of the transaction that made the change, so an
action and its entry commit together; a refused action is recorded with
``status='failure'`` in a transaction of its own (the change rolled back).
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Connection

ACTOR_TYPES = {"session": "user", "api_key": "api_key", "host": "host"}


def actor_fields(actor: Principal | None) -> tuple[str, str, str]:
    """(actor_type, actor_id, actor_name) of a principal; ``system`` when None."""
    if actor is None:
        return "system", "", "system"
    kind = ACTOR_TYPES.get(actor.auth_type, "user")
    if kind == "api_key":
        return kind, actor.api_key_id, actor.api_key_name or actor.api_key_id
    if kind == "host":
        return kind, actor.host_id, actor.host_id
    return kind, actor.user_id, actor.name or actor.email


def write(conn: Connection, *, actor: Principal | None, action: str, resource_type: str,
          resource_id: str = "", team_id: str | None = None, scope: str = "team",
          status: str = "success", metadata: dict[str, Any] | None = None,
          actor_override: tuple[str, str, str] | None = None) -> None:
    """Append one audit entry in the caller's transaction."""
    actor_type, actor_id, actor_name = actor_override or actor_fields(actor)
    conn.execute(
        """
        INSERT INTO audit_log (team_id, actor_type, actor_id, actor_name, resource_type,
                               resource_id, action, scope, status, metadata)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (team_id, actor_type, actor_id, actor_name, resource_type, resource_id, action, scope,
         status, Jsonb(metadata or {})),
    )
