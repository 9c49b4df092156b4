"""Browser sessions and API keys: issuing them and resolving them at the edge.

A session is an opaque ``wrenn_sid`` value (stored as its hash) scoped to one
team, with an idle window (``session_idle_s``, refreshed at most once a
minute) and an absolute lifetime (``session_absolute_s``). Its CSRF token is
the double-submit value of the ``wrenn_csrf`` cookie; auth keeps its hash so
the gateway can check the header against the session, not only the cookie.
"""

from __future__ import annotations

from typing import Any

from dovecote.bus.messages.auth import Resolved, SessionIssued, SessionResponse
from dovecote.bus.messages.common import ClientInfo, Principal
from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError
from dovecote.services.auth import crypto

UNAUTHORIZED = ServiceError(401, "unauthorized", "authentication required")


def issue(conn: Connection, *, user: dict[str, Any], team_id: str, client: ClientInfo,
          absolute_s: int) -> SessionIssued:
    """Create a session for ``user`` in ``team_id`` and return its cookie values."""
    sid, csrf = crypto.new_token(), crypto.new_token()
    session_id = crypto.new_id("ses")
    role = conn.execute("SELECT role FROM team_members WHERE team_id = %s AND user_id = %s",
                        (team_id, user["id"])).fetchone()
    if role is None:
        raise ServiceError(403, "forbidden", "not a member of this team")
    conn.execute(
        """
        INSERT INTO sessions (id, sid_hash, csrf_hash, user_id, team_id, user_agent, ip_address,
                              expires_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s))
        """,
        (session_id, crypto.token_hash(sid), crypto.token_hash(csrf), user["id"], team_id,
         client.user_agent[:512], client.ip[:64], absolute_s),
    )
    body = SessionResponse(user_id=user["id"], team_id=team_id, email=user["email"],
                       name=user["name"], role=role["role"], is_admin=user["is_admin"])
    return SessionIssued(body=body, sid=sid, csrf=csrf, max_age_s=absolute_s)


def default_team(conn: Connection, user_id: str) -> str | None:
    """The team a fresh login lands in: the user's default team, else the oldest."""
    row = conn.execute(
        """
        SELECT t.id FROM team_members m JOIN teams t ON t.id = m.team_id
        WHERE m.user_id = %s AND t.deleted_at IS NULL
        ORDER BY (m.role = 'owner' AND t.is_default) DESC, m.joined_at
        LIMIT 1
        """,
        (user_id,),
    ).fetchone()
    return row["id"] if row else None


def resolve_session(conn: Connection, sid: str, idle_s: int) -> Resolved:
    """The principal behind a session cookie, refreshing its idle window."""
    row = conn.execute(
        """
        SELECT s.id, s.csrf_hash, s.team_id, s.last_seen_at, s.expires_at,
               LEAST(EXTRACT(EPOCH FROM s.expires_at - now()),
                     EXTRACT(EPOCH FROM s.last_seen_at + make_interval(secs => %s) - now()))
                   AS remaining,
               u.id AS user_id, u.email, u.name, u.is_admin, m.role
        FROM sessions s
        JOIN users u ON u.id = s.user_id
        JOIN teams t ON t.id = s.team_id
        JOIN team_members m ON m.team_id = s.team_id AND m.user_id = s.user_id
        WHERE s.sid_hash = %s AND s.revoked_at IS NULL AND s.expires_at > now()
          AND s.last_seen_at > now() - make_interval(secs => %s)
          AND u.is_active AND u.deleted_at IS NULL AND t.deleted_at IS NULL
        """,
        (idle_s, crypto.token_hash(sid), idle_s),
    ).fetchone()
    if row is None:
        raise UNAUTHORIZED
    conn.execute(
        "UPDATE sessions SET last_seen_at = now() WHERE id = %s "
        "AND last_seen_at < now() - interval '60 seconds'", (row["id"],))
    principal = Principal(auth_type="session", user_id=row["user_id"], team_id=row["team_id"],
                          role=row["role"], is_admin=row["is_admin"], email=row["email"],
                          name=row["name"], session_id=row["id"])
    return Resolved(principal=principal, csrf_hash=bytes(row["csrf_hash"]),
                    expires_in_s=max(0, int(row["remaining"])))


def resolve_api_key(conn: Connection, key: str) -> Resolved:
    """The principal behind an ``X-API-Key`` value; records ``last_used``."""
    if not key.startswith(crypto.API_KEY_PREFIX):
        raise UNAUTHORIZED
    row = conn.execute(
        """
        SELECT k.id, k.name, k.team_id, u.id AS user_id, u.email, u.name AS user_name,
               u.is_admin, m.role
        FROM api_keys k
        JOIN teams t ON t.id = k.team_id
        JOIN users u ON u.id = k.created_by
        LEFT JOIN team_members m ON m.team_id = k.team_id AND m.user_id = k.created_by
        WHERE k.key_hash = %s AND k.deleted_at IS NULL AND t.deleted_at IS NULL
          AND u.is_active AND u.deleted_at IS NULL
        """,
        (crypto.token_hash(key),),
    ).fetchone()
    if row is None:
        raise UNAUTHORIZED
    conn.execute("UPDATE api_keys SET last_used = now() WHERE id = %s "
                 "AND (last_used IS NULL OR last_used < now() - interval '10 seconds')",
                 (row["id"],))
    principal = Principal(auth_type="api_key", user_id=row["user_id"], team_id=row["team_id"],
                          role=row["role"] or "member", is_admin=False, email=row["email"],
                          name=row["user_name"], api_key_id=row["id"], api_key_name=row["name"])
    return Resolved(principal=principal, expires_in_s=0)

