"""The admin plane: every account and team, for platform admins.

Each handler checks the caller against the database (not only the cached
principal) in the same transaction as its change, writes its ``admin``
scope audit entry there too, and after the commit tells the gateways to
drop cached principals the change made stale.

The platform must keep one active admin: revoking the flag from, or
deactivating, the last active admin is refused with 409 ``last_admin``. The
check locks every active admin's row, so two admins demoting each other at
once cannot both succeed.

``dovecote admin create`` (:class:`CreateAdmin`) creates an active admin
with a team of its own, or promotes (and activates) the live account that
has the address, keeping that account's password.
"""

from __future__ import annotations

from typing import Any

from dovecote.bus.messages import auth as m
from dovecote.bus.messages import auth_admin as a
from dovecote.bus.messages.auth_teams import TEAM_DELETED_TOPIC, TeamDeleted
from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError, UniqueViolation
from dovecote.libs.timefmt import rfc3339
from dovecote.services.auth import audit, crypto
from dovecote.services.auth.access import require_platform_admin
from dovecote.services.auth.accounts import check_name, check_password, create_team, normalize_email
from dovecote.services.auth.context import AuthContext
from dovecote.services.auth.teams import evict

USER_NOT_FOUND = ServiceError(404, "not_found", "user not found")
TEAM_NOT_FOUND = ServiceError(404, "not_found", "team not found")
CLI_ACTOR = ("system", "", "dovecote admin create")


def _live_user(conn: Connection, user_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM users WHERE id = %s AND deleted_at IS NULL FOR UPDATE",
                       (user_id,)).fetchone()
    if row is None:
        raise USER_NOT_FOUND
    return dict(row)


def _keep_an_admin(conn: Connection, user_id: str) -> None:
    """409 if ``user_id`` is the only active platform admin."""
    admins = conn.execute("SELECT id FROM users WHERE is_admin AND is_active AND deleted_at IS NULL "
                          "ORDER BY id FOR UPDATE").fetchall()
    if all(row["id"] == user_id for row in admins):
        raise ServiceError(409, "last_admin", "the platform must keep at least one active admin")


def _revoke_user_sessions(conn: Connection, user_id: str) -> list[str]:
    rows = conn.execute("UPDATE sessions SET revoked_at = now() "
                        "WHERE user_id = %s AND revoked_at IS NULL RETURNING id", (user_id,))
    return [row["id"] for row in rows.fetchall()]


class Admin:
    """The handlers of ``/v1/admin/{users,teams}`` and ``dovecote admin create``."""

    def __init__(self, ctx: AuthContext) -> None:
        self.ctx = ctx

    # -- listings ----------------------------------------------------------------

    async def list_users(self, msg: a.AdminListUsers) -> a.AdminUsersReply:
        def work(conn: Connection) -> list[dict[str, Any]]:
            require_platform_admin(conn, msg.actor)
            return list(conn.execute(
                """
                SELECT u.id, u.email, u.name, u.is_active, u.is_admin,
                       u.password_hash IS NOT NULL AS has_password, u.created_at, u.updated_at,
                       (SELECT count(*) FROM team_members m JOIN teams t ON t.id = m.team_id
                        WHERE m.user_id = u.id AND t.deleted_at IS NULL) AS team_count
                FROM users u WHERE u.deleted_at IS NULL
                ORDER BY u.created_at, u.id
                """).fetchall())

        rows = await self.ctx.db.transaction(work)
        return a.AdminUsersReply(users=[a.AdminUser(
            id=r["id"], email=r["email"], name=r["name"], is_active=r["is_active"],
            is_admin=r["is_admin"], has_password=r["has_password"], team_count=r["team_count"],
            created_at=rfc3339(r["created_at"]), updated_at=rfc3339(r["updated_at"]))
            for r in rows])

    async def list_teams(self, msg: a.AdminListTeams) -> a.AdminTeamsReply:
        def work(conn: Connection) -> list[dict[str, Any]]:
            require_platform_admin(conn, msg.actor)
            return list(conn.execute(
                """
                SELECT t.id, t.name, t.slug, t.is_default, t.byoc, t.created_at,
                       (SELECT count(*) FROM team_members m WHERE m.team_id = t.id) AS member_count,
                       o.id AS owner_id, o.email AS owner_email
                FROM teams t
                LEFT JOIN team_members om ON om.team_id = t.id AND om.role = 'owner'
                LEFT JOIN users o ON o.id = om.user_id
                WHERE t.deleted_at IS NULL
                ORDER BY t.created_at, t.id
                """).fetchall())

        rows = await self.ctx.db.transaction(work)
        return a.AdminTeamsReply(teams=[a.AdminTeam(
            id=r["id"], name=r["name"], slug=r["slug"], is_default=r["is_default"], byoc=r["byoc"],
            member_count=r["member_count"], owner_id=r["owner_id"], owner_email=r["owner_email"],
            created_at=rfc3339(r["created_at"])) for r in rows])

    # -- teams -------------------------------------------------------------------

    async def set_team_byoc(self, msg: a.AdminSetTeamByoc) -> m.Done:
        def work(conn: Connection) -> None:
            require_platform_admin(conn, msg.actor)
            row = conn.execute("SELECT byoc FROM teams WHERE id = %s AND deleted_at IS NULL "
                               "FOR UPDATE", (msg.team_id,)).fetchone()
            if row is None:
                raise TEAM_NOT_FOUND
            conn.execute("UPDATE teams SET byoc = %s WHERE id = %s", (msg.byoc, msg.team_id))
            audit.write(conn, actor=msg.actor, action="set_byoc", resource_type="team",
                        resource_id=msg.team_id, team_id=msg.team_id, scope="admin",
                        metadata={"byoc": msg.byoc, "previous": row["byoc"]})

        await self.ctx.db.transaction(work)
        return m.Done()

    async def delete_team(self, msg: a.AdminDeleteTeam) -> m.Done:
        """Soft-delete any team, as its owner's ``DELETE /v1/teams/{id}`` does.

        Unlike the owner, an admin may delete a default team. Members'
        sessions on it move to their home team, or end when they have none
        left; its API keys are deleted; ``team.deleted`` tells the services
        that own the team's resources to release them.
        """

        def work(conn: Connection) -> tuple[str, list[str]]:
            require_platform_admin(conn, msg.actor)
            row = conn.execute("UPDATE teams SET deleted_at = now() "
                               "WHERE id = %s AND deleted_at IS NULL RETURNING name, deleted_at",
                               (msg.team_id,)).fetchone()
            if row is None:
                raise TEAM_NOT_FOUND
            users = conn.execute("SELECT DISTINCT user_id FROM sessions WHERE team_id = %s "
                                 "AND revoked_at IS NULL", (msg.team_id,)).fetchall()
            gone = evict(conn, msg.team_id, [u["user_id"] for u in users], revoke_keys=False)
            keys = conn.execute("UPDATE api_keys SET deleted_at = now() "
                                "WHERE team_id = %s AND deleted_at IS NULL", (msg.team_id,))
            audit.write(conn, actor=msg.actor, action="delete", resource_type="team",
                        resource_id=msg.team_id, team_id=msg.team_id, scope="admin",
                        metadata={"name": row["name"], "sessions_moved": len(gone.session_ids),
                                  "api_keys_deleted": max(keys.rowcount, 0)})
            return rfc3339(row["deleted_at"]), gone.session_ids

        deleted_at, moved = await self.ctx.db.transaction(work)
        await self.ctx.invalidate(session_ids=moved, team_ids=[msg.team_id])
        await self.ctx.bus.publish(TEAM_DELETED_TOPIC, TeamDeleted(
            team_id=msg.team_id, deleted_at=deleted_at, actor=msg.actor))
        return m.Done()

    # -- users -------------------------------------------------------------------

    async def set_user_active(self, msg: a.AdminSetUserActive) -> m.Done:
        def work(conn: Connection) -> list[str]:
            require_platform_admin(conn, msg.actor)
            user = _live_user(conn, msg.user_id)
            revoked: list[str] = []
            if not msg.active and user["is_active"] and user["is_admin"]:
                _keep_an_admin(conn, msg.user_id)
            conn.execute("UPDATE users SET is_active = %s, updated_at = now() WHERE id = %s",
                         (msg.active, msg.user_id))
            if not msg.active:
                revoked = _revoke_user_sessions(conn, msg.user_id)
            audit.write(conn, actor=msg.actor, action="activate" if msg.active else "deactivate",
                        resource_type="user", resource_id=msg.user_id, scope="admin",
                        metadata={"email": user["email"], "previous": user["is_active"],
                                  "sessions_revoked": len(revoked)})
            return revoked

        revoked = await self.ctx.db.transaction(work)
        await self.ctx.invalidate(session_ids=revoked, user_ids=[msg.user_id])
        return m.Done()

    async def set_user_admin(self, msg: a.AdminSetUserAdmin) -> m.Done:
        def work(conn: Connection) -> None:
            require_platform_admin(conn, msg.actor)
            user = _live_user(conn, msg.user_id)
            if not msg.admin and user["is_admin"]:
                _keep_an_admin(conn, msg.user_id)
            conn.execute("UPDATE users SET is_admin = %s, updated_at = now() WHERE id = %s",
                         (msg.admin, msg.user_id))
            audit.write(conn, actor=msg.actor, action="grant_admin" if msg.admin else "revoke_admin",
                        resource_type="user", resource_id=msg.user_id, scope="admin",
                        metadata={"email": user["email"], "previous": user["is_admin"]})

        await self.ctx.db.transaction(work)
        await self.ctx.invalidate(user_ids=[msg.user_id])
        return m.Done()

    # -- dovecote admin create -----------------------------------------------------

    async def create_admin(self, msg: a.CreateAdmin) -> a.AdminCreated:
        email = normalize_email(msg.email)
        name = check_name(msg.name)
        check_password(msg.password)
        password_hash = await self.ctx.hash_password(msg.password)

        def work(conn: Connection) -> a.AdminCreated:
            existing = conn.execute("SELECT * FROM users WHERE lower(email) = %s "
                                    "AND deleted_at IS NULL FOR UPDATE", (email,)).fetchone()
            if existing is not None:
                user_id = existing["id"]
                conn.execute("UPDATE users SET is_admin = true, is_active = true, updated_at = now() "
                             "WHERE id = %s", (user_id,))
                # A pending sign-up's activation link must not stay usable.
                conn.execute("UPDATE one_time_tokens SET used_at = now() WHERE user_id = %s "
                             "AND purpose = 'activation' AND used_at IS NULL", (user_id,))
                audit.write(conn, actor=None, action="promote_admin", resource_type="user",
                            resource_id=user_id, scope="admin", actor_override=CLI_ACTOR,
                            metadata={"email": email, "was_admin": existing["is_admin"],
                                      "was_active": existing["is_active"]})
                created = False
            else:
                user_id = crypto.new_id("usr")
                conn.execute(
                    "INSERT INTO users (id, email, name, password_hash, is_active, is_admin) "
                    "VALUES (%s, %s, %s, %s, true, true)", (user_id, email, name, password_hash))
                create_team(conn, owner_id=user_id, name=f"{name}'s team", is_default=True)
                audit.write(conn, actor=None, action="create_admin", resource_type="user",
                            resource_id=user_id, scope="admin", actor_override=CLI_ACTOR,
                            metadata={"email": email})
                created = True
            return a.AdminCreated(user_id=user_id, email=email, created=created)

        try:
            created = await self.ctx.db.transaction(work)
        except UniqueViolation:  # a sign-up with this address committed meanwhile
            raise ServiceError(409, "email_taken", "an account with this email was just created; "
                               "run the command again to promote it") from None
        await self.ctx.invalidate(user_ids=[created.user_id])
        return created

    def register(self, handle: Any) -> None:
        """Register every handler with the service's dispatcher."""
        for message_type, handler in {
            a.AdminListUsers: self.list_users, a.AdminListTeams: self.list_teams,
            a.AdminSetTeamByoc: self.set_team_byoc, a.AdminDeleteTeam: self.delete_team,
            a.AdminSetUserActive: self.set_user_active, a.AdminSetUserAdmin: self.set_user_admin,
            a.CreateAdmin: self.create_admin,
        }.items():
            handle(message_type, handler)

