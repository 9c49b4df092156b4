"""Accounts: sign-up to password reset, and the caller's own sessions.

Every handler takes one bus message and returns its reply; refusals raise
:class:`~dovecote.libs.errors.ServiceError` (the gateway's 4xx). Each state
change and its audit entry commit in one transaction; anything that makes a
cached principal stale publishes :class:`AuthInvalidated` after the commit.
"""

from __future__ import annotations

import re
from typing import Any

from dovecote.bus.messages import auth as m
from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import rfc3339
from dovecote.services.auth import access, audit, crypto, ratelimit, sessions
from dovecote.services.auth.access import require_session
from dovecote.services.auth.context import AuthContext

log = get_logger("dovecote.auth.accounts")

EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s.]{2,63}$")
INVALID_TOKEN = ServiceError(400, "invalid_token", "the token is invalid, expired or already used")


def normalize_email(email: str) -> str:
    """Lower-cased, trimmed address, or 400 if it is not one."""
    email = email.strip().lower()
    if len(email) > 254 or not EMAIL.match(email):
        raise ServiceError(400, "invalid_email", "a valid email address is required")
    return email


def check_password(password: str) -> None:
    """400 unless the password is 8 to 256 characters."""
    if not 8 <= len(password) <= 256:
        raise ServiceError(400, "weak_password", "the password must have 8 to 256 characters")


def check_name(name: str) -> str:
    """A display name: 1 to 100 printable characters."""
    name = name.strip()
    if not 1 <= len(name) <= 100 or not name.isprintable():
        raise ServiceError(400, "invalid_name", "the name must have 1 to 100 printable characters")
    return name


def _user(conn: Connection, user_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM users WHERE id = %s AND deleted_at IS NULL",
                       (user_id,)).fetchone()
    if row is None:
        raise sessions.UNAUTHORIZED
    return dict(row)


def _issue_token(conn: Connection, user_id: str, purpose: str, ttl_s: int) -> str:
    token = crypto.new_token()
    conn.execute("UPDATE one_time_tokens SET used_at = now() "
                 "WHERE user_id = %s AND purpose = %s AND used_at IS NULL", (user_id, purpose))
    conn.execute(
        "INSERT INTO one_time_tokens (token_hash, purpose, user_id, expires_at) "
        "VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
        (crypto.token_hash(token), purpose, user_id, ttl_s))
    return token


def _consume_token(conn: Connection, token: str, purpose: str) -> str:
    row = conn.execute(
        "UPDATE one_time_tokens SET used_at = now() "
        "WHERE token_hash = %s AND purpose = %s AND used_at IS NULL AND expires_at > now() "
        "RETURNING user_id", (crypto.token_hash(token), purpose)).fetchone()
    if row is None:
        raise INVALID_TOKEN
    return str(row["user_id"])


def create_team(conn: Connection, *, owner_id: str, name: str, is_default: bool) -> str:
    """A new team owned by ``owner_id``; returns its id."""
    team_id = crypto.new_id("team")
    conn.execute("INSERT INTO teams (id, name, slug, is_default) VALUES (%s, %s, %s, %s)",
                 (team_id, name, crypto.team_slug(), is_default))
    conn.execute("INSERT INTO team_members (team_id, user_id, role) VALUES (%s, %s, 'owner')",
                 (team_id, owner_id))
    return team_id


def _revoke_all(conn: Connection, user_id: str) -> list[str]:
    rows = conn.execute(
        "UPDATE sessions SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL "
        "RETURNING id", (user_id,)).fetchall()
    return [r["id"] for r in rows]


def _self_actor(user: dict[str, Any]) -> tuple[str, str, str]:
    return ("user", user["id"], user["name"] or user["email"])


class Accounts:
    """The handlers of the accounts operations."""

    def __init__(self, ctx: AuthContext) -> None:
        self.ctx = ctx
        self.config = ctx.config

    # -- edge authentication ---------------------------------------------------

    async def resolve_session(self, msg: m.ResolveSession) -> m.Resolved:
        return await self.ctx.db.transaction(
            lambda conn: sessions.resolve_session(conn, msg.sid, self.config.session_idle_s))

    async def resolve_api_key(self, msg: m.ResolveApiKey) -> m.Resolved:
        return await self.ctx.db.transaction(lambda conn: sessions.resolve_api_key(conn, msg.key))

    # -- sign-up and activation ------------------------------------------------

    async def signup(self, msg: m.Signup) -> m.MessageReply:
        email = normalize_email(msg.email)
        check_password(msg.password)
        name = check_name(msg.name)
        password_hash = await self.ctx.hash_password(msg.password)
        cooldown = self.config.signup_cooldown_s

        def work(conn: Connection) -> str | None:
            ratelimit.check(conn, f"signup:ip:{msg.client.ip}", self.config.signup_max_per_ip, 3600)
            ratelimit.hit(conn, f"signup:ip:{msg.client.ip}")
            existing = conn.execute(
                "SELECT id, is_active, activation_sent_at > now() - make_interval(secs => %s) AS cooling "
                "FROM users WHERE lower(email) = %s AND deleted_at IS NULL FOR UPDATE",
                (cooldown, email)).fetchone()
            if existing and existing["is_active"]:
                raise ServiceError(409, "email_taken", "an account with this email already exists")
            if existing and existing["cooling"]:
                raise ServiceError(409, "signup_cooldown",
                                   "an activation email was sent recently; check your inbox")
            if existing:  # an inactive account asks again: refresh it
                user_id = existing["id"]
                conn.execute("UPDATE users SET name = %s, password_hash = %s, "
                             "activation_sent_at = now(), updated_at = now() WHERE id = %s",
                             (name, password_hash, user_id))
            else:
                user_id = crypto.new_id("usr")
                first = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM users) AS first").fetchone()
                conn.execute(
                    "INSERT INTO users (id, email, name, password_hash, is_admin, activation_sent_at) "
                    "VALUES (%s, %s, %s, %s, %s, now())",
                    (user_id, email, name, password_hash, bool(first and first["first"])))
            token = _issue_token(conn, user_id, "activation", self.config.activation_ttl_s)
            audit.write(conn, actor=None, action="signup", resource_type="user",
                        resource_id=user_id, scope="user",
                        actor_override=("user", user_id, name))
            return token

        token = await self.ctx.db.transaction(work)
        if token:
            link = f"{self.config.public_url.rstrip('/')}/activate?token={token}"
            await self.ctx.mailer.send(
                email, "Activate your Dovecote account",
                f"Hello {name},\n\nActivate your account within 30 minutes:\n{link}\n\n"
                f"Activation token: {token}\n")
        return m.MessageReply(message="Account created. Check your email to activate it "
                                      "within 30 minutes.")

    async def activate(self, msg: m.Activate) -> m.SessionIssued:
        def work(conn: Connection) -> m.SessionIssued:
            user_id = _consume_token(conn, msg.token, "activation")
            user = conn.execute("UPDATE users SET is_active = true, updated_at = now() "
                                "WHERE id = %s AND deleted_at IS NULL RETURNING *",
                                (user_id,)).fetchone()
            if user is None:
                raise INVALID_TOKEN
            team_id = sessions.default_team(conn, user_id)
            if team_id is None:
                team_id = create_team(conn, owner_id=user_id, name=f"{user['name']}'s team",
                                      is_default=True)
            issued = sessions.issue(conn, user=dict(user), team_id=team_id, client=msg.client,
                                    absolute_s=self.config.session_absolute_s)
            audit.write(conn, actor=None, action="activate", resource_type="user",
                        resource_id=user_id, team_id=team_id, scope="user",
                        actor_override=_self_actor(dict(user)))
            return issued

        return await self.ctx.db.transaction(work)

    # -- login and logout ------------------------------------------------------

    async def login(self, msg: m.Login) -> m.SessionIssued:
        email = msg.email.strip().lower()
        acct, ip = f"login:acct:{email}", f"login:ip:{msg.client.ip}"
        limits = self.config

        def check(conn: Connection) -> dict[str, Any] | None:
            ratelimit.check(conn, acct, limits.login_max_per_account, limits.login_window_s)
            ratelimit.check(conn, ip, limits.login_max_per_ip, limits.login_window_s)
            row = conn.execute("SELECT * FROM users WHERE lower(email) = %s AND deleted_at IS NULL",
                               (email,)).fetchone()
            return dict(row) if row else None

        user = await self.ctx.db.transaction(check)
        ok = await self.ctx.verify_password(user["password_hash"] if user else None, msg.password)

        def finish(conn: Connection) -> m.SessionIssued:
            if not ok or user is None or not user["is_active"]:
                raise ServiceError(401, "invalid_credentials", "invalid email or password")
            ratelimit.clear(conn, acct)
            team_id = sessions.default_team(conn, user["id"])
            if team_id is None:
                team_id = create_team(conn, owner_id=user["id"], name=f"{user['name']}'s team",
                                      is_default=True)
            issued = sessions.issue(conn, user=user, team_id=team_id, client=msg.client,
                                    absolute_s=self.config.session_absolute_s)
            audit.write(conn, actor=None, action="login", resource_type="session",
                        resource_id=user["id"], team_id=team_id, scope="user",
                        actor_override=_self_actor(user))
            return issued

        # A failed attempt must be recorded even though the login is refused:
        # the refusal is raised after the transaction commits.
        try:
            return await self.ctx.db.transaction(finish)
        except ServiceError as exc:
            if exc.status == 401:
                reason = "inactive" if ok else "bad_password"
                await self.ctx.db.transaction(
                    lambda conn: _record_failure(conn, acct, ip, user, reason))
            raise

    async def logout(self, msg: m.Logout) -> m.Done:
        require_session(msg.actor)

        def work(conn: Connection) -> None:
            conn.execute("UPDATE sessions SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
                         (msg.actor.session_id,))
            audit.write(conn, actor=msg.actor, action="logout", resource_type="session",
                        resource_id=msg.actor.session_id, team_id=msg.actor.team_id, scope="user")

        await self.ctx.db.transaction(work)
        await self.ctx.invalidate(session_ids=[msg.actor.session_id])
        return m.Done()

    async def logout_all(self, msg: m.LogoutAll) -> m.Done:
        require_session(msg.actor)

        def work(conn: Connection) -> list[str]:
            revoked = _revoke_all(conn, msg.actor.user_id)
            audit.write(conn, actor=msg.actor, action="logout_all", resource_type="session",
                        resource_id=msg.actor.user_id, team_id=msg.actor.team_id, scope="user",
                        metadata={"revoked": len(revoked)})
            return revoked

        revoked = await self.ctx.db.transaction(work)
        await self.ctx.invalidate(session_ids=revoked, user_ids=[msg.actor.user_id])
        return m.Done()

    # -- the caller's sessions -------------------------------------------------

    async def list_sessions(self, msg: m.ListSessions) -> m.SessionsReply:
        require_session(msg.actor)
        rows = await self.ctx.db.fetchall(
            """
            SELECT id, user_agent, ip_address, created_at, last_seen_at, expires_at FROM sessions
            WHERE user_id = %s AND revoked_at IS NULL AND expires_at > now()
              AND last_seen_at > now() - make_interval(secs => %s)
            ORDER BY last_seen_at DESC
            """,
            (msg.actor.user_id, self.config.session_idle_s))
        return m.SessionsReply(sessions=[
            m.SessionEntry(id=r["id"], user_agent=r["user_agent"], ip_address=r["ip_address"],
                           created_at=rfc3339(r["created_at"]),
                           last_seen_at=rfc3339(r["last_seen_at"]),
                           expires_at=rfc3339(r["expires_at"]),
                           current=r["id"] == msg.actor.session_id)
            for r in rows])

    async def revoke_session(self, msg: m.RevokeSession) -> m.Done:
        require_session(msg.actor)

        def work(conn: Connection) -> None:
            row = conn.execute(
                "UPDATE sessions SET revoked_at = now() "
                "WHERE id = %s AND user_id = %s AND revoked_at IS NULL RETURNING id",
                (msg.session_id, msg.actor.user_id)).fetchone()
            if row is None:
                raise ServiceError(404, "not_found", "no such session")
            audit.write(conn, actor=msg.actor, action="revoke", resource_type="session",
                        resource_id=msg.session_id, team_id=msg.actor.team_id, scope="user")

        await self.ctx.db.transaction(work)
        await self.ctx.invalidate(session_ids=[msg.session_id])
        return m.Done()

    async def switch_team(self, msg: m.SwitchTeam) -> m.SessionIssued:
        require_session(msg.actor)

        def work(conn: Connection) -> m.SessionIssued:
            team = conn.execute("SELECT id FROM teams WHERE id = %s AND deleted_at IS NULL",
                                (msg.team_id,)).fetchone()
            if team is None:
                raise ServiceError(404, "not_found", "team not found")
            if not access.is_member(conn, msg.actor.user_id, msg.team_id):
                raise access.NOT_A_MEMBER
            conn.execute("UPDATE sessions SET revoked_at = now() WHERE id = %s",
                         (msg.actor.session_id,))
            user = _user(conn, msg.actor.user_id)
            issued = sessions.issue(conn, user=user, team_id=msg.team_id, client=msg.client,
                                    absolute_s=self.config.session_absolute_s)
            audit.write(conn, actor=msg.actor, action="switch_team", resource_type="team",
                        resource_id=msg.team_id, team_id=msg.team_id, scope="user",
                        metadata={"from_team": msg.actor.team_id})
            return issued

        issued = await self.ctx.db.transaction(work)
        await self.ctx.invalidate(session_ids=[msg.actor.session_id])
        return issued

    # -- the caller's account --------------------------------------------------

    async def get_me(self, msg: m.GetMe) -> m.MeReply:
        user = await self.ctx.db.fetchone(
            "SELECT name, email, password_hash IS NOT NULL AS has_password FROM users "
            "WHERE id = %s AND deleted_at IS NULL", (msg.actor.user_id,))
        if user is None:
            raise sessions.UNAUTHORIZED
        providers = await self.ctx.db.fetchall(
            "SELECT provider FROM oauth_identities WHERE user_id = %s ORDER BY provider",
            (msg.actor.user_id,))
        return m.MeReply(body=m.MeResponse(name=user["name"], email=user["email"],
                                       has_password=user["has_password"],
                                       providers=[p["provider"] for p in providers]))

    async def update_me(self, msg: m.UpdateMe) -> m.Done:
        name = check_name(msg.name)

        def work(conn: Connection) -> None:
            conn.execute("UPDATE users SET name = %s, updated_at = now() WHERE id = %s",
                         (name, msg.actor.user_id))
            audit.write(conn, actor=msg.actor, action="update", resource_type="user",
                        resource_id=msg.actor.user_id, team_id=msg.actor.team_id, scope="user",
                        metadata={"name": name})

        await self.ctx.db.transaction(work)
        await self.ctx.invalidate(user_ids=[msg.actor.user_id])
        return m.Done()

    async def delete_me(self, msg: m.DeleteMe) -> m.Done:
        require_session(msg.actor)

        def work(conn: Connection) -> list[str]:
            blocking = conn.execute(
                """
                SELECT t.id FROM team_members o JOIN teams t ON t.id = o.team_id
                WHERE o.user_id = %s AND o.role = 'owner' AND t.deleted_at IS NULL
                  AND EXISTS (SELECT 1 FROM team_members x
                              WHERE x.team_id = o.team_id AND x.user_id <> o.user_id)
                """, (msg.actor.user_id,)).fetchall()
            if blocking:
                raise ServiceError(409, "owns_team_with_members",
                                   "transfer or delete the teams you own that have other members first")
            user = _user(conn, msg.actor.user_id)
            if msg.confirmation.strip().lower() != user["email"].lower():
                raise ServiceError(400, "confirmation_mismatch",
                                   "confirmation must be your email address")
            if user["is_admin"]:
                admins = conn.execute("SELECT count(*) AS n FROM users WHERE is_admin "
                                      "AND deleted_at IS NULL").fetchone()
                if admins and admins["n"] <= 1:
                    raise ServiceError(409, "last_admin", "the last platform admin cannot be deleted")
            conn.execute(
                "UPDATE users SET deleted_at = now(), is_active = false, "
                "purge_after = now() + make_interval(days => %s) WHERE id = %s",
                (self.config.purge_days, msg.actor.user_id))
            conn.execute("UPDATE teams SET deleted_at = now() WHERE deleted_at IS NULL AND id IN "
                         "(SELECT team_id FROM team_members WHERE user_id = %s AND role = 'owner')",
                         (msg.actor.user_id,))
            conn.execute("UPDATE api_keys SET deleted_at = now() WHERE created_by = %s "
                         "AND deleted_at IS NULL", (msg.actor.user_id,))
            revoked = _revoke_all(conn, msg.actor.user_id)
            audit.write(conn, actor=msg.actor, action="delete", resource_type="user",
                        resource_id=msg.actor.user_id, team_id=msg.actor.team_id, scope="user",
                        metadata={"purge_after_days": self.config.purge_days})
            return revoked

        revoked = await self.ctx.db.transaction(work)
        await self.ctx.invalidate(session_ids=revoked, user_ids=[msg.actor.user_id])
        return m.Done()

    async def change_password(self, msg: m.ChangePassword) -> m.Done:
        require_session(msg.actor)
        check_password(msg.new_password)
        user = await self.ctx.db.transaction(lambda conn: _user(conn, msg.actor.user_id))
        if user["password_hash"]:
            if not msg.current_password or not await self.ctx.verify_password(
                    user["password_hash"], msg.current_password):
                raise ServiceError(401, "invalid_password", "the current password is wrong")
        elif msg.confirm_password != msg.new_password:
            raise ServiceError(400, "password_mismatch", "confirm_password must match new_password")
        new_hash = await self.ctx.hash_password(msg.new_password)

        def work(conn: Connection) -> list[str]:
            conn.execute("UPDATE users SET password_hash = %s, updated_at = now() WHERE id = %s",
                         (new_hash, msg.actor.user_id))
            revoked = _revoke_all(conn, msg.actor.user_id)
            audit.write(conn, actor=msg.actor, action="change_password" if user["password_hash"]
                        else "add_password", resource_type="user", resource_id=msg.actor.user_id,
                        team_id=msg.actor.team_id, scope="user")
            return revoked

        revoked = await self.ctx.db.transaction(work)
        await self.ctx.invalidate(session_ids=revoked, user_ids=[msg.actor.user_id])
        return m.Done()

    # -- password reset --------------------------------------------------------

    async def request_password_reset(self, msg: m.RequestPasswordReset) -> m.Done:
        email = msg.email.strip().lower()

        def work(conn: Connection) -> tuple[str, str] | None:
            # Over the limit: answer 204 all the same (no enumeration, no mail).
            try:
                ratelimit.check(conn, f"reset:acct:{email}", 3, 3600)
                ratelimit.check(conn, f"reset:ip:{msg.client.ip}", 10, 3600)
            except ServiceError:
                return None
            ratelimit.hit(conn, f"reset:acct:{email}")
            ratelimit.hit(conn, f"reset:ip:{msg.client.ip}")
            user = conn.execute("SELECT id, name FROM users WHERE lower(email) = %s "
                                "AND deleted_at IS NULL AND is_active", (email,)).fetchone()
            if user is None:
                return None
            token = _issue_token(conn, user["id"], "password_reset", self.config.reset_ttl_s)
            audit.write(conn, actor=None, action="request_password_reset", resource_type="user",
                        resource_id=user["id"], scope="user",
                        actor_override=("user", user["id"], user["name"]))
            return token, user["name"]

        found = await self.ctx.db.transaction(work)
        if found:
            token, name = found
            link = f"{self.config.public_url.rstrip('/')}/reset-password?token={token}"
            await self.ctx.mailer.send(
                email, "Reset your Dovecote password",
                f"Hello {name},\n\nReset your password within 15 minutes:\n{link}\n\n"
                f"Reset token: {token}\n\nIf you did not ask for this, ignore this mail.\n")
        return m.Done()

    async def confirm_password_reset(self, msg: m.ConfirmPasswordReset) -> m.Done:
        check_password(msg.new_password)
        new_hash = await self.ctx.hash_password(msg.new_password)

        def work(conn: Connection) -> tuple[str, list[str]]:
            user_id = _consume_token(conn, msg.token, "password_reset")
            conn.execute("UPDATE users SET password_hash = %s, updated_at = now() WHERE id = %s",
                         (new_hash, user_id))
            revoked = _revoke_all(conn, user_id)
            user = _user(conn, user_id)
            audit.write(conn, actor=None, action="reset_password", resource_type="user",
                        resource_id=user_id, scope="user", actor_override=_self_actor(user))
            return user_id, revoked

        user_id, revoked = await self.ctx.db.transaction(work)
        await self.ctx.invalidate(session_ids=revoked, user_ids=[user_id])
        return m.Done()

    # -- outbox ----------------------------------------------------------------

    async def list_outbox(self, msg: m.ListOutbox) -> m.OutboxReply:
        rows = await self.ctx.db.fetchall(
            "SELECT id, to_addr, subject, body, created_at FROM outbox ORDER BY id DESC LIMIT %s",
            (max(1, min(msg.limit, 200)),))
        return m.OutboxReply(mails=[
            m.OutboxMail(id=r["id"], to=r["to_addr"], subject=r["subject"], body=r["body"],
                         created_at=rfc3339(r["created_at"])) for r in rows])

    def register(self, handle: Any) -> None:
        """Register every handler with the service's dispatcher."""
        for message_type, handler in {
            m.ResolveSession: self.resolve_session, m.ResolveApiKey: self.resolve_api_key,
            m.Signup: self.signup, m.Activate: self.activate, m.Login: self.login,
            m.Logout: self.logout, m.LogoutAll: self.logout_all,
            m.ListSessions: self.list_sessions, m.RevokeSession: self.revoke_session,
            m.SwitchTeam: self.switch_team, m.GetMe: self.get_me, m.UpdateMe: self.update_me,
            m.DeleteMe: self.delete_me, m.ChangePassword: self.change_password,
            m.RequestPasswordReset: self.request_password_reset,
            m.ConfirmPasswordReset: self.confirm_password_reset, m.ListOutbox: self.list_outbox,
        }.items():
            handle(message_type, handler)


def _record_failure(conn: Connection, acct: str, ip: str, user: dict[str, Any] | None,
                    reason: str) -> None:
    ratelimit.hit(conn, acct)
    ratelimit.hit(conn, ip)
    if user is not None:
        audit.write(conn, actor=None, action="login", resource_type="user", resource_id=user["id"],
                    scope="user", status="failure", actor_override=_self_actor(user),
                    metadata={"reason": reason})
