"""API keys of a team: create (shown once), list, delete.

A key is ``wrn_`` and 48 hex characters (:func:`crypto.new_api_key`); the
database keeps its SHA-256 and a display prefix (``wrn_ab12cd34...``), never
the key. Keys belong to the caller's active team: listing and deleting only
ever see that team's keys, so another team's key id answers 404. Managing
keys needs a signed-in session (the reference's ``sessionAuth``), so a key
cannot mint or revoke keys. Any member of the team may manage its keys.

``dovecote key create`` (:class:`~dovecote.bus.messages.auth_teams.CreateLocalKey`)
mints a key without a session: the CLI's access to the suite's bus is its
right to ask, as for ``dovecote admin create``. It makes the account when
there is none (active, no password, a default team of its own; the platform's
first account is its admin, as with a sign-up) and activates a pending one.
"""

from __future__ import annotations

from typing import Any

from dovecote.bus.messages import auth_teams as t
from dovecote.bus.messages.auth import Done
from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError, UniqueViolation
from dovecote.libs.timefmt import rfc3339
from dovecote.services.auth import audit, crypto
from dovecote.services.auth.access import require_member, require_session
from dovecote.services.auth.accounts import check_name, create_team, normalize_email
from dovecote.services.auth.context import AuthContext

DEFAULT_NAME = "Unnamed API Key"
LOCAL_ACTOR = ("system", "", "dovecote key create")
PREFIX_CHARS = 12  # "wrn_" and 8 hex characters


def key_prefix(key: str) -> str:
    """What lists show of a key: ``wrn_ab12cd34...``."""
    return key[:PREFIX_CHARS] + "..."


def check_key_name(name: str) -> str:
    """A trimmed key name (the default when blank), or 400."""
    name = name.strip() or DEFAULT_NAME
    if len(name) > 128 or not name.isprintable():
        raise ServiceError(400, "invalid_name", "the key name must have at most 128 printable characters")
    return name


def key_body(row: dict[str, Any]) -> t.APIKeyResponse:
    return t.APIKeyResponse(id=row["id"], team_id=row["team_id"], name=row["name"],
                            key_prefix=row["key_prefix"], created_at=rfc3339(row["created_at"]),
                            last_used=rfc3339(row["last_used"]) if row["last_used"] else None)


class ApiKeys:
    """The handlers of ``/v1/api-keys*``."""

    def __init__(self, ctx: AuthContext) -> None:
        self.ctx = ctx

    async def create_key(self, msg: t.CreateApiKey) -> t.ApiKeyCreated:
        require_session(msg.actor)
        name = check_key_name(msg.name)
        key = crypto.new_api_key()

        def work(conn: Connection) -> t.CreatedAPIKeyResponse:
            require_member(conn, msg.actor)
            key_id = crypto.new_id("key")
            row = conn.execute(
                """
                INSERT INTO api_keys (id, team_id, created_by, name, key_prefix, key_hash)
                VALUES (%s, %s, %s, %s, %s, %s) RETURNING created_at
                """,
                (key_id, msg.actor.team_id, msg.actor.user_id, name, key_prefix(key),
                 crypto.token_hash(key))).fetchone()
            assert row is not None
            audit.write(conn, actor=msg.actor, action="create", resource_type="api_key",
                        resource_id=key_id, team_id=msg.actor.team_id, scope="team",
                        metadata={"name": name, "key_prefix": key_prefix(key)})
            return t.CreatedAPIKeyResponse(
                id=key_id, team_id=msg.actor.team_id, name=name, key_prefix=key_prefix(key),
                created_at=rfc3339(row["created_at"]), last_used=None, key=key)

        return t.ApiKeyCreated(body=await self.ctx.db.transaction(work))

    async def list_keys(self, msg: t.ListApiKeys) -> t.ApiKeysReply:
        require_session(msg.actor)

        def work(conn: Connection) -> list[t.APIKeyResponse]:
            require_member(conn, msg.actor)
            rows = conn.execute(
                "SELECT id, team_id, name, key_prefix, created_at, last_used FROM api_keys "
                "WHERE team_id = %s AND deleted_at IS NULL ORDER BY created_at DESC, id",
                (msg.actor.team_id,)).fetchall()
            return [key_body(dict(r)) for r in rows]

        return t.ApiKeysReply(keys=await self.ctx.db.transaction(work))

    async def delete_key(self, msg: t.DeleteApiKey) -> Done:
        require_session(msg.actor)

        def work(conn: Connection) -> None:
            require_member(conn, msg.actor)
            row = conn.execute(
                "UPDATE api_keys SET deleted_at = now() "
                "WHERE id = %s AND team_id = %s AND deleted_at IS NULL RETURNING name",
                (msg.key_id, msg.actor.team_id)).fetchone()
            if row is None:
                raise ServiceError(404, "not_found", "API key not found")
            audit.write(conn, actor=msg.actor, action="delete", resource_type="api_key",
                        resource_id=msg.key_id, team_id=msg.actor.team_id, scope="team",
                        metadata={"name": row["name"]})

        await self.ctx.db.transaction(work)
        await self.ctx.invalidate(api_key_ids=[msg.key_id])
        return Done()

    async def create_local_key(self, msg: t.CreateLocalKey) -> t.LocalKeyCreated:
        email = normalize_email(msg.email)
        user_name = check_name(msg.name.strip() or email.split("@", 1)[0])
        name = check_key_name(msg.key_name)
        key = crypto.new_api_key()

        def work(conn: Connection) -> t.LocalKeyCreated:
            user = conn.execute("SELECT id, is_active FROM users WHERE lower(email) = %s "
                                "AND deleted_at IS NULL FOR UPDATE", (email,)).fetchone()
            created = user is None
            if user is None:
                user_id = crypto.new_id("usr")
                first = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM users) AS first").fetchone()
                conn.execute("INSERT INTO users (id, email, name, is_active, is_admin) "
                             "VALUES (%s, %s, %s, true, %s)",
                             (user_id, email, user_name, bool(first and first["first"])))
                audit.write(conn, actor=None, action="create", resource_type="user",
                            resource_id=user_id, scope="user", actor_override=LOCAL_ACTOR,
                            metadata={"email": email})
            else:
                user_id = user["id"]
                if not user["is_active"]:
                    conn.execute("UPDATE users SET is_active = true, updated_at = now() "
                                 "WHERE id = %s", (user_id,))
                    # The pending sign-up's activation link must not stay usable.
                    conn.execute("UPDATE one_time_tokens SET used_at = now() WHERE user_id = %s "
                                 "AND purpose = 'activation' AND used_at IS NULL", (user_id,))
            team = conn.execute(
                "SELECT t.id FROM teams t JOIN team_members m ON m.team_id = t.id "
                "WHERE m.user_id = %s AND t.deleted_at IS NULL "
                "ORDER BY t.is_default DESC, (m.role = 'owner') DESC, t.created_at, t.id LIMIT 1",
                (user_id,)).fetchone()
            team_id = team["id"] if team is not None else create_team(
                conn, owner_id=user_id, name=f"{user_name}'s team", is_default=True)
            key_id = crypto.new_id("key")
            row = conn.execute(
                "INSERT INTO api_keys (id, team_id, created_by, name, key_prefix, key_hash) "
                "VALUES (%s, %s, %s, %s, %s, %s) RETURNING created_at",
                (key_id, team_id, user_id, name, key_prefix(key), crypto.token_hash(key))).fetchone()
            assert row is not None
            audit.write(conn, actor=None, action="create", resource_type="api_key",
                        resource_id=key_id, team_id=team_id, scope="team",
                        actor_override=LOCAL_ACTOR,
                        metadata={"name": name, "key_prefix": key_prefix(key), "email": email})
            body = t.CreatedAPIKeyResponse(
                id=key_id, team_id=team_id, name=name, key_prefix=key_prefix(key),
                created_at=rfc3339(row["created_at"]), last_used=None, key=key)
            return t.LocalKeyCreated(body=body, user_id=user_id, email=email, account_created=created)

        try:
            reply = await self.ctx.db.transaction(work)
        except UniqueViolation:  # a sign-up with this address committed meanwhile
            raise ServiceError(409, "email_taken", "an account with this email was just created; "
                               "run the command again") from None
        await self.ctx.invalidate(user_ids=[reply.user_id])
        return reply

    def register(self, handle: Any) -> None:
        """Register every handler with the service's dispatcher."""
        for message_type, handler in {
            t.CreateApiKey: self.create_key, t.ListApiKeys: self.list_keys,
            t.DeleteApiKey: self.delete_key, t.CreateLocalKey: self.create_local_key,
        }.items():
            handle(message_type, handler)
