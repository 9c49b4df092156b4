"""Teams and their members, and the user search of the add-member dialog.

Every ``/v1/teams/{id}*`` operation acts on the caller's *active* team, as in
the reference: an ``id`` other than the session's team is refused with 403
before anything is read ("use switch-team first"), so a user of one team
learns nothing about another, not even whether it exists. The caller's role
is then read from the database (locking the team row for changes), never
taken from the cached principal.

Losing a team (removal, leaving, deletion) must end the user's access at
once: the membership row goes (or the team is marked deleted), the sessions
whose active team it was move to the user's default team (revoked if none is
left), the API keys the user created in it are revoked, and after the commit
auth publishes ``auth.invalidate`` so gateways drop the cached principals.
Deleting a team also publishes :class:`TeamDeleted` on ``team.deleted`` for
the services that own its capsules.

A user's default team (the one made at activation) cannot be deleted: login
and every "move the session home" above rely on it existing; deleting the
account deletes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from dovecote.bus.messages import auth_teams as t
from dovecote.bus.messages.auth import Done
from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import rfc3339
from dovecote.services.auth import audit, sessions
from dovecote.services.auth.access import (
    MANAGERS,
    NEEDS_MANAGER,
    caller_role,
    require_session,
)
from dovecote.services.auth.accounts import create_team, normalize_email
from dovecote.services.auth.apikeys import ApiKeys
from dovecote.services.auth.context import AuthContext

log = get_logger("dovecote.auth.teams")

T = TypeVar("T")

# The reference documents "A-Z a-z 0-9 space _"; its server also takes - @ '
# (default teams are named "Ana's team"), so we accept that superset.
TEAM_NAME = re.compile(r"^[A-Za-z0-9 _\-@']{1,128}$")
SEARCH_LIMIT = 10
MEMBER_NOT_FOUND = ServiceError(404, "not_found", "the user is not a member of this team")
# Refusals of a member of the team, written to its audit log as failures.
AUDITED_REFUSALS = {"insufficient_role", "owner_immutable", "owner_cannot_leave", "default_team"}


def check_team_name(name: str) -> str:
    """A trimmed team name, or 400."""
    name = name.strip()
    if not TEAM_NAME.match(name):
        raise ServiceError(400, "invalid_team_name",
                           "the team name must have 1 to 128 characters: A-Z a-z 0-9 space _ - @ '")
    return name


def team_body(row: dict[str, Any]) -> t.Team:
    return t.Team(id=row["id"], name=row["name"], slug=row["slug"],
                  created_at=rfc3339(row["created_at"]))


def team_with_role(row: dict[str, Any]) -> t.TeamWithRole:
    return t.TeamWithRole(id=row["id"], name=row["name"], slug=row["slug"],
                          created_at=rfc3339(row["created_at"]), role=row["role"])


def member_body(row: dict[str, Any]) -> t.TeamMember:
    return t.TeamMember(user_id=row["user_id"], email=row["email"], role=row["role"],
                        joined_at=rfc3339(row["joined_at"]))


def _members(conn: Connection, team_id: str) -> list[t.TeamMember]:
    rows = conn.execute(
        """
        SELECT m.user_id, u.email, m.role, m.joined_at
        FROM team_members m JOIN users u ON u.id = m.user_id
        WHERE m.team_id = %s AND u.deleted_at IS NULL
        ORDER BY m.joined_at, m.user_id
        """, (team_id,)).fetchall()
    return [member_body(r) for r in rows]


def _target(conn: Connection, team_id: str, user_id: str) -> str:
    row = conn.execute("SELECT role FROM team_members WHERE team_id = %s AND user_id = %s "
                       "FOR UPDATE", (team_id, user_id)).fetchone()
    if row is None:
        raise MEMBER_NOT_FOUND
    return str(row["role"])


class Eviction:
    """What a lost team took away: sessions moved or revoked, keys revoked."""

    def __init__(self) -> None:
        self.session_ids: list[str] = []
        self.api_key_ids: list[str] = []


def evict(conn: Connection, team_id: str, user_ids: Iterable[str], *,
          revoke_keys: bool) -> Eviction:
    """End the access of ``user_ids`` to ``team_id`` (call after the change).

    Each user's live sessions on the team move to the team a fresh login
    would land in, or are revoked when the user has none left; with
    ``revoke_keys`` the API keys they created in the team are revoked too.
    """
    out = Eviction()
    for user_id in user_ids:
        rows = conn.execute("SELECT id FROM sessions WHERE team_id = %s AND user_id = %s "
                            "AND revoked_at IS NULL", (team_id, user_id)).fetchall()
        ids = [r["id"] for r in rows]
        if ids:
            home = sessions.default_team(conn, user_id)
            if home is not None and home != team_id:
                conn.execute("UPDATE sessions SET team_id = %s WHERE id = ANY(%s)", (home, ids))
            else:
                conn.execute("UPDATE sessions SET revoked_at = now() WHERE id = ANY(%s)", (ids,))
            out.session_ids.extend(ids)
        if revoke_keys:
            keys = conn.execute(
                "UPDATE api_keys SET deleted_at = now() WHERE team_id = %s AND created_by = %s "
                "AND deleted_at IS NULL RETURNING id", (team_id, user_id)).fetchall()
            out.api_key_ids.extend(k["id"] for k in keys)
    return out


class Teams:
    """The handlers of ``/v1/teams*`` and ``/v1/users/search``."""

    def __init__(self, ctx: AuthContext) -> None:
        self.ctx = ctx

    async def _change(self, actor: Principal, team_id: str, action: str, resource_type: str,
                      resource_id: str, work: Callable[[Connection], T]) -> T:
        """Run a change; a refusal by role or owner rule is audited as a failure.

        Refusals before the caller is known to be in the team (another team,
        a deleted one) are not written to that team's log: the caller could
        otherwise write into the log of any team whose id they guess.
        """
        try:
            return await self.ctx.db.transaction(work)
        except ServiceError as exc:
            if exc.code in AUDITED_REFUSALS:
                reason = exc.code
                await self.ctx.db.transaction(lambda conn: audit.write(
                    conn, actor=actor, action=action, resource_type=resource_type,
                    resource_id=resource_id, team_id=team_id, scope="team", status="failure",
                    metadata={"reason": reason}))
            raise

    # -- teams -----------------------------------------------------------------

    async def list_teams(self, msg: t.ListTeams) -> t.TeamsReply:
        require_session(msg.actor)
        rows = await self.ctx.db.fetchall(
            """
            SELECT tm.id, tm.name, tm.slug, tm.created_at, m.role
            FROM team_members m JOIN teams tm ON tm.id = m.team_id
            WHERE m.user_id = %s AND tm.deleted_at IS NULL
            ORDER BY tm.created_at, tm.id
            """, (msg.actor.user_id,))
        return t.TeamsReply(teams=[team_with_role(r) for r in rows])

    async def create_team(self, msg: t.CreateTeam) -> t.TeamReply:
        require_session(msg.actor)
        name = check_team_name(msg.name)

        def work(conn: Connection) -> t.TeamWithRole:
            team_id = create_team(conn, owner_id=msg.actor.user_id, name=name, is_default=False)
            row = conn.execute("SELECT id, name, slug, created_at, 'owner' AS role FROM teams "
                               "WHERE id = %s", (team_id,)).fetchone()
            assert row is not None
            audit.write(conn, actor=msg.actor, action="create", resource_type="team",
                        resource_id=team_id, team_id=team_id, scope="team",
                        metadata={"name": name})
            return team_with_role(dict(row))

        return t.TeamReply(body=await self.ctx.db.transaction(work))

    async def get_team(self, msg: t.GetTeam) -> t.TeamDetailReply:
        require_session(msg.actor)

        def work(conn: Connection) -> t.TeamDetail:
            caller_role(conn, msg.actor, msg.team_id, lock=False)
            team = conn.execute("SELECT id, name, slug, created_at FROM teams WHERE id = %s",
                                (msg.team_id,)).fetchone()
            assert team is not None
            return t.TeamDetail(team=team_body(dict(team)), members=_members(conn, msg.team_id))

        return t.TeamDetailReply(body=await self.ctx.db.transaction(work))

    async def rename_team(self, msg: t.RenameTeam) -> Done:
        require_session(msg.actor)
        name = check_team_name(msg.name)

        def work(conn: Connection) -> None:
            if caller_role(conn, msg.actor, msg.team_id, lock=True) not in MANAGERS:
                raise NEEDS_MANAGER
            old = conn.execute("SELECT name FROM teams WHERE id = %s", (msg.team_id,)).fetchone()
            conn.execute("UPDATE teams SET name = %s WHERE id = %s", (name, msg.team_id))
            audit.write(conn, actor=msg.actor, action="rename", resource_type="team",
                        resource_id=msg.team_id, team_id=msg.team_id, scope="team",
                        metadata={"old_name": old["name"] if old else "", "name": name})

        await self._change(msg.actor, msg.team_id, "rename", "team", msg.team_id, work)
        return Done()

    async def delete_team(self, msg: t.DeleteTeam) -> Done:
        require_session(msg.actor)

        def work(conn: Connection) -> tuple[str, Eviction]:
            if caller_role(conn, msg.actor, msg.team_id, lock=True) != "owner":
                raise ServiceError(403, "insufficient_role", "only the owner can delete the team")
            team = conn.execute(
                "UPDATE teams SET deleted_at = now() WHERE id = %s AND NOT is_default "
                "RETURNING deleted_at", (msg.team_id,)).fetchone()
            if team is None:
                raise ServiceError(409, "default_team",
                                   "your default team cannot be deleted; delete your account instead")
            users = conn.execute("SELECT DISTINCT user_id FROM sessions WHERE team_id = %s "
                                 "AND revoked_at IS NULL", (msg.team_id,)).fetchall()
            gone = evict(conn, msg.team_id, [u["user_id"] for u in users], revoke_keys=False)
            audit.write(conn, actor=msg.actor, action="delete", resource_type="team",
                        resource_id=msg.team_id, team_id=msg.team_id, scope="team",
                        metadata={"sessions_moved": len(gone.session_ids)})
            return rfc3339(team["deleted_at"]), gone

        deleted_at, gone = await self._change(msg.actor, msg.team_id, "delete", "team",
                                              msg.team_id, work)
        await self.ctx.invalidate(team_ids=[msg.team_id], session_ids=gone.session_ids)
        await self.ctx.bus.publish(t.TEAM_DELETED_TOPIC, t.TeamDeleted(
            team_id=msg.team_id, deleted_at=deleted_at, actor=msg.actor))
        log.info("team deleted", extra={"team_id": msg.team_id})
        return Done()

    # -- members ---------------------------------------------------------------

    async def list_members(self, msg: t.ListMembers) -> t.MembersReply:
        require_session(msg.actor)

        def work(conn: Connection) -> list[t.TeamMember]:
            caller_role(conn, msg.actor, msg.team_id, lock=False)
            return _members(conn, msg.team_id)

        return t.MembersReply(members=await self.ctx.db.transaction(work))

    async def add_member(self, msg: t.AddMember) -> t.MemberReply:
        require_session(msg.actor)
        email = normalize_email(msg.email)

        def work(conn: Connection) -> t.TeamMember:
            if caller_role(conn, msg.actor, msg.team_id, lock=True) not in MANAGERS:
                raise NEEDS_MANAGER
            user = conn.execute("SELECT id, email FROM users WHERE lower(email) = %s "
                                "AND deleted_at IS NULL AND is_active", (email,)).fetchone()
            if user is None:
                raise ServiceError(404, "user_not_found", "no account with that email")
            row = conn.execute(
                "INSERT INTO team_members (team_id, user_id, role) VALUES (%s, %s, 'member') "
                "ON CONFLICT DO NOTHING RETURNING joined_at", (msg.team_id, user["id"])).fetchone()
            if row is None:
                raise ServiceError(400, "already_member", "the user is already a member of this team")
            audit.write(conn, actor=msg.actor, action="add", resource_type="member",
                        resource_id=user["id"], team_id=msg.team_id, scope="team",
                        metadata={"email": user["email"], "role": "member"})
            return t.TeamMember(user_id=user["id"], email=user["email"], role="member",
                                joined_at=rfc3339(row["joined_at"]))

        member = await self._change(msg.actor, msg.team_id, "add", "member", email, work)
        return t.MemberReply(body=member)

    async def update_member_role(self, msg: t.UpdateMemberRole) -> Done:
        require_session(msg.actor)
        if msg.role not in ("admin", "member"):
            raise ServiceError(400, "invalid_role", "role must be admin or member")

        def work(conn: Connection) -> None:
            if caller_role(conn, msg.actor, msg.team_id, lock=True) not in MANAGERS:
                raise NEEDS_MANAGER
            old = _target(conn, msg.team_id, msg.user_id)
            if old == "owner":
                raise ServiceError(403, "owner_immutable", "the owner's role cannot be changed")
            conn.execute("UPDATE team_members SET role = %s WHERE team_id = %s AND user_id = %s",
                         (msg.role, msg.team_id, msg.user_id))
            audit.write(conn, actor=msg.actor, action="update_role", resource_type="member",
                        resource_id=msg.user_id, team_id=msg.team_id, scope="team",
                        metadata={"old_role": old, "role": msg.role})

        await self._change(msg.actor, msg.team_id, "update_role", "member", msg.user_id, work)
        await self.ctx.invalidate(user_ids=[msg.user_id])
        return Done()

    async def remove_member(self, msg: t.RemoveMember) -> Done:
        require_session(msg.actor)

        def work(conn: Connection) -> Eviction:
            if caller_role(conn, msg.actor, msg.team_id, lock=True) not in MANAGERS:
                raise NEEDS_MANAGER
            role = _target(conn, msg.team_id, msg.user_id)
            if role == "owner":
                raise ServiceError(403, "owner_immutable", "the owner cannot be removed from the team")
            conn.execute("DELETE FROM team_members WHERE team_id = %s AND user_id = %s",
                         (msg.team_id, msg.user_id))
            gone = evict(conn, msg.team_id, [msg.user_id], revoke_keys=True)
            audit.write(conn, actor=msg.actor, action="remove", resource_type="member",
                        resource_id=msg.user_id, team_id=msg.team_id, scope="team",
                        metadata={"role": role, "api_keys_revoked": len(gone.api_key_ids)})
            return gone

        gone = await self._change(msg.actor, msg.team_id, "remove", "member", msg.user_id, work)
        await self.ctx.invalidate(user_ids=[msg.user_id], session_ids=gone.session_ids,
                                  api_key_ids=gone.api_key_ids)
        return Done()

    async def leave_team(self, msg: t.LeaveTeam) -> Done:
        require_session(msg.actor)

        def work(conn: Connection) -> Eviction:
            role = caller_role(conn, msg.actor, msg.team_id, lock=True)
            if role == "owner":
                raise ServiceError(403, "owner_cannot_leave",
                                   "the owner cannot leave the team; delete the team instead")
            conn.execute("DELETE FROM team_members WHERE team_id = %s AND user_id = %s",
                         (msg.team_id, msg.actor.user_id))
            gone = evict(conn, msg.team_id, [msg.actor.user_id], revoke_keys=True)
            audit.write(conn, actor=msg.actor, action="leave", resource_type="member",
                        resource_id=msg.actor.user_id, team_id=msg.team_id, scope="team",
                        metadata={"role": role, "api_keys_revoked": len(gone.api_key_ids)})
            return gone

        gone = await self._change(msg.actor, msg.team_id, "leave", "member", msg.actor.user_id,
                                  work)
        await self.ctx.invalidate(user_ids=[msg.actor.user_id], session_ids=gone.session_ids,
                                  api_key_ids=gone.api_key_ids)
        return Done()

    # -- user search -----------------------------------------------------------

    async def search_users(self, msg: t.SearchUsers) -> t.UsersReply:
        require_session(msg.actor)
        prefix = msg.email.strip().lower()
        if "@" not in prefix or not 3 <= len(prefix) <= 254 or not prefix.isprintable():
            raise ServiceError(400, "invalid_request",
                               "the email prefix must have 3 to 254 characters and contain '@'")
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = await self.ctx.db.fetchall(
            "SELECT id, email FROM users WHERE lower(email) LIKE %s ESCAPE '\\' "
            "AND is_active AND deleted_at IS NULL ORDER BY lower(email), id LIMIT %s",
            (pattern, SEARCH_LIMIT))
        return t.UsersReply(users=[t.UserSearchResult(user_id=r["id"], email=r["email"])
                                   for r in rows])

    def register(self, handle: Any) -> None:
        """Register every handler with the service's dispatcher.

        The team's API keys (:mod:`.apikeys`) are registered with it.
        """
        ApiKeys(self.ctx).register(handle)
        for message_type, handler in {
            t.ListTeams: self.list_teams, t.CreateTeam: self.create_team,
            t.GetTeam: self.get_team, t.RenameTeam: self.rename_team,
            t.DeleteTeam: self.delete_team, t.ListMembers: self.list_members,
            t.AddMember: self.add_member, t.UpdateMemberRole: self.update_member_role,
            t.RemoveMember: self.remove_member, t.LeaveTeam: self.leave_team,
            t.SearchUsers: self.search_users,
        }.items():
            handle(message_type, handler)
