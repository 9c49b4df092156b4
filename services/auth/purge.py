"""Purging soft-deleted accounts once their grace period is over.

``DELETE /v1/me`` soft-deletes an account: ``deleted_at`` is set, sessions
are revoked, owned teams and created API keys are soft-deleted, and
``purge_after`` is set ``purge_days`` (15) ahead, so a mistake can still be
undone by an operator. :func:`serve_purge` runs in the auth service's nursery
and, every ``purge_interval_s``, purges the accounts whose ``purge_after``
has passed.

Purging *anonymizes* the ``users`` row instead of deleting it: other rows
(teams' owner memberships, API keys, and whatever later tables reference
users) keep a valid foreign key, and audit entries keep an actor id. What
goes is everything personal or usable: email, name and password hash; the
sessions (with their IP addresses and user agents), one-time tokens and OAuth
identities; memberships of teams the user did not own; the mails queued for
the address and the rate-limit buckets named after it; the actor name on the
user's audit entries and the metadata of the account's own (``scope='user'``)
entries, which can hold the old name. A purged account has ``deleted_at``
set and ``purge_after`` NULL, so it is never picked again.

Each account is purged in its own transaction (``FOR UPDATE SKIP LOCKED``),
so several auth workers can run the loop at once and one failure does not
hold up the others.
"""

from __future__ import annotations

import functools

import trio

from dovecote.libs.db import Connection, Database
from dovecote.libs.logs import get_logger
from dovecote.services.auth import audit
from dovecote.services.auth.context import AuthContext

log = get_logger("dovecote.auth.purge")

PURGED_NAME = "Deleted user"
BATCH = 100


def due_accounts(conn: Connection, limit: int = BATCH) -> list[str]:
    """Ids of soft-deleted accounts whose ``purge_after`` has passed."""
    rows = conn.execute(
        "SELECT id FROM users WHERE deleted_at IS NOT NULL AND purge_after IS NOT NULL "
        "AND purge_after <= now() ORDER BY purge_after LIMIT %s", (limit,)).fetchall()
    return [r["id"] for r in rows]


def purge_account(conn: Connection, user_id: str) -> bool:
    """Purge one account if it is (still) due; True if it was purged."""
    user = conn.execute(
        "SELECT id, email FROM users WHERE id = %s AND deleted_at IS NOT NULL "
        "AND purge_after IS NOT NULL AND purge_after <= now() FOR UPDATE SKIP LOCKED",
        (user_id,)).fetchone()
    if user is None:
        return False
    email = user["email"].lower()
    conn.execute("DELETE FROM sessions WHERE user_id = %s", (user_id,))
    conn.execute("DELETE FROM one_time_tokens WHERE user_id = %s", (user_id,))
    conn.execute("DELETE FROM oauth_identities WHERE user_id = %s", (user_id,))
    conn.execute("DELETE FROM team_members WHERE user_id = %s AND role <> 'owner'", (user_id,))
    conn.execute("DELETE FROM outbox WHERE lower(to_addr) = %s", (email,))
    conn.execute("DELETE FROM rate_limit_hits WHERE bucket IN (%s, %s)",
                 (f"login:acct:{email}", f"reset:acct:{email}"))
    conn.execute("UPDATE audit_log SET actor_name = %s WHERE actor_type = 'user' AND actor_id = %s",
                 (PURGED_NAME, user_id))
    conn.execute("UPDATE audit_log SET metadata = '{}' WHERE scope = 'user' AND resource_id = %s",
                 (user_id,))
    conn.execute(
        "UPDATE users SET email = '', name = %s, password_hash = NULL, is_active = false, "
        "is_admin = false, activation_sent_at = NULL, purge_after = NULL, updated_at = now() "
        "WHERE id = %s", (PURGED_NAME, user_id))
    audit.write(conn, actor=None, action="purge", resource_type="user", resource_id=user_id,
                scope="admin")
    return True


async def purge_due_accounts(db: Database, limit: int = BATCH) -> int:
    """Purge every due account (in batches); returns how many were purged."""
    total = 0
    while True:
        ids = await db.transaction(lambda conn: due_accounts(conn, limit))
        purged = 0
        for user_id in ids:
            if await db.transaction(functools.partial(purge_account, user_id=user_id)):
                purged += 1
        total += purged
        # A short batch is the last one; a batch whose rows others hold is left to them.
        if len(ids) < limit or purged == 0:
            return total


async def serve_purge(ctx: AuthContext, *,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Purge due accounts every ``purge_interval_s`` until the service stops."""
    task_status.started()
    stopping = ctx.service.stopping
    while not stopping.is_set():
        try:
            purged = await purge_due_accounts(ctx.db)
            if purged:
                log.info("accounts purged", extra={"count": purged})
        except Exception:  # the database may be briefly away: try again next round
            log.exception("account purge failed")
        with trio.move_on_after(ctx.config.purge_interval_s):
            await stopping.wait()
