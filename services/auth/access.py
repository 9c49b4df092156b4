"""Who may do what in auth: the membership and role checks, in one place.

Every check runs in the caller's transaction (``conn``): the principal comes
from a gateway cache a few seconds old, so a flag or a membership it claims is
confirmed in the database. A refusal is a :class:`ServiceError`:

==========================  ======  ==============================================
check                       status  refusal
==========================  ======  ==============================================
:func:`require_session`     403     ``session_required`` (an API key or a host)
:func:`require_platform_admin` 403  ``forbidden``
:func:`require_member`      403     ``forbidden`` (not in their active team)
:func:`caller_role`         403/404 ``forbidden`` (another team, no membership),
                                    ``not_found`` (the team is deleted)
:func:`require_manager`     403     ``insufficient_role`` (not owner or admin)
==========================  ======  ==============================================

:func:`is_platform_admin` and :func:`active_team_role` answer without refusing,
for handlers that hide what the caller may not see (404, never 403).
"""

from __future__ import annotations

from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError

MANAGERS = ("owner", "admin")
"""Roles that manage a team (members, hosts, the team's audit log)."""

WRONG_TEAM = ServiceError(403, "forbidden",
                          "the team does not match your active team; use switch-team first")
NOT_A_MEMBER = ServiceError(403, "forbidden", "you are not a member of this team")
TEAM_NOT_FOUND = ServiceError(404, "not_found", "team not found")
NEEDS_MANAGER = ServiceError(403, "insufficient_role", "admin or owner role required")


def require_session(actor: Principal) -> None:
    """403 unless the caller authenticated with a session cookie."""
    if actor.auth_type != "session":
        raise ServiceError(403, "session_required", "this operation requires a signed-in session")


def is_platform_admin(conn: Connection, actor: Principal) -> bool:
    """Whether ``actor`` is a session of a live, active platform admin (the cached
    flag, confirmed in the database)."""
    if actor.auth_type != "session" or not actor.is_admin:
        return False
    row = conn.execute("SELECT 1 FROM users WHERE id = %s AND is_admin AND is_active "
                       "AND deleted_at IS NULL", (actor.user_id,)).fetchone()
    return row is not None


def require_platform_admin(conn: Connection, actor: Principal) -> None:
    """403 unless ``actor`` is a session of a live, active platform admin."""
    if not is_platform_admin(conn, actor):
        raise ServiceError(403, "forbidden", "platform admin access required")


def is_member(conn: Connection, user_id: str, team_id: str) -> bool:
    """Whether ``user_id`` belongs to the live team ``team_id``."""
    row = conn.execute(
        "SELECT 1 FROM team_members m JOIN teams t ON t.id = m.team_id "
        "WHERE m.team_id = %s AND m.user_id = %s AND t.deleted_at IS NULL",
        (team_id, user_id)).fetchone()
    return row is not None


def require_member(conn: Connection, actor: Principal) -> None:
    """403 unless the caller still belongs to their (live) active team."""
    if not is_member(conn, actor.user_id, actor.team_id):
        raise NOT_A_MEMBER


def active_team_role(conn: Connection, actor: Principal, team_id: str | None) -> str | None:
    """The caller's role in ``team_id`` if it is their live active team, else None."""
    if not team_id or team_id != actor.team_id:
        return None
    row = conn.execute(
        "SELECT m.role FROM team_members m JOIN teams t ON t.id = m.team_id "
        "WHERE m.team_id = %s AND m.user_id = %s AND t.deleted_at IS NULL",
        (team_id, actor.user_id)).fetchone()
    return str(row["role"]) if row else None


def caller_role(conn: Connection, actor: Principal, team_id: str, *, lock: bool) -> str:
    """The caller's role in ``team_id``, which must be their active team.

    403 for another team or a lost membership, 404 if the team is deleted.
    With ``lock`` the team row is locked, serializing every change to it.
    """
    if not team_id or team_id != actor.team_id:
        raise WRONG_TEAM
    team = conn.execute("SELECT id FROM teams WHERE id = %s AND deleted_at IS NULL"
                        + (" FOR UPDATE" if lock else ""), (team_id,)).fetchone()
    if team is None:
        raise TEAM_NOT_FOUND
    row = conn.execute("SELECT role FROM team_members WHERE team_id = %s AND user_id = %s",
                       (team_id, actor.user_id)).fetchone()
    if row is None:
        raise NOT_A_MEMBER
    return str(row["role"])


def require_manager(role: str | None) -> None:
    """403 ``insufficient_role`` unless ``role`` manages its team."""
    if role not in MANAGERS:
        raise NEEDS_MANAGER
