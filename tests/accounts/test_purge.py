"""The purge of soft-deleted accounts, against the auth schema in PostgreSQL.

The public API can only set ``purge_after`` 15 days ahead, so these tests
build accounts directly in a fresh schema migrated with auth's own
migrations, then run the purge functions the auth service's loop runs.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

from dovecote.libs.db import Connection, Database, open_database
from dovecote.libs.migrations import apply_migrations
from dovecote.services.auth import audit, crypto
from dovecote.services.auth.purge import (
    PURGED_NAME,
    due_accounts,
    purge_account,
    purge_due_accounts,
    serve_purge,
)


@pytest.fixture
async def auth_db(postgres_url: str) -> AsyncIterator[Database]:
    """A fresh schema with auth's tables."""
    schema = f"t_purge_{uuid.uuid4().hex[:12]}"
    await apply_migrations(postgres_url, schema,
                           resources.files("dovecote.services.auth").joinpath("migrations"))
    try:
        async with open_database(postgres_url, schema=schema, max_size=4) as db:
            yield db
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def add_user(conn: Connection, name: str, *, deleted: str | None = None) -> dict[str, str]:
    """A user with a default team, a session, a token, an identity, mail, limits
    and audit entries. ``deleted``: an interval (``'-1 day'``: due a day ago)."""
    user_id, team_id = crypto.new_id("usr"), crypto.new_id("team")
    email = f"{name.lower()}-{uuid.uuid4().hex[:6]}@example.com"
    conn.execute("INSERT INTO users (id, email, name, password_hash, is_active) "
                 "VALUES (%s, %s, %s, 'hash', true)", (user_id, email, name))
    conn.execute("INSERT INTO teams (id, name, slug, is_default) VALUES (%s, %s, %s, true)",
                 (team_id, f"{name}'s team", crypto.team_slug()))
    conn.execute("INSERT INTO team_members (team_id, user_id, role) VALUES (%s, %s, 'owner')",
                 (team_id, user_id))
    conn.execute("INSERT INTO sessions (id, sid_hash, csrf_hash, user_id, team_id, user_agent, "
                 "ip_address, expires_at) VALUES (%s, %s, %s, %s, %s, 'Firefox', '203.0.113.9', "
                 "now() + interval '1 day')",
                 (crypto.new_id("ses"), crypto.token_hash(crypto.new_token()),
                  crypto.token_hash(crypto.new_token()), user_id, team_id))
    conn.execute("INSERT INTO one_time_tokens (token_hash, purpose, user_id, expires_at) "
                 "VALUES (%s, 'password_reset', %s, now() + interval '1 hour')",
                 (crypto.token_hash(crypto.new_token()), user_id))
    conn.execute("INSERT INTO oauth_identities (provider, provider_user_id, user_id, email, login) "
                 "VALUES ('github', %s, %s, %s, %s)", (uuid.uuid4().hex, user_id, email, name))
    conn.execute("INSERT INTO api_keys (id, team_id, created_by, name, key_prefix, key_hash) "
                 "VALUES (%s, %s, %s, 'ci', 'wrn_', %s)",
                 (crypto.new_id("key"), team_id, user_id, crypto.token_hash(crypto.new_token())))
    conn.execute("INSERT INTO outbox (to_addr, subject, body) VALUES (%s, 'Reset', 'token')",
                 (email.upper(),))
    conn.execute("INSERT INTO rate_limit_hits (bucket) VALUES (%s)", (f"login:acct:{email}",))
    audit.write(conn, actor=None, action="update", resource_type="user", resource_id=user_id,
                scope="user", actor_override=("user", user_id, name), metadata={"name": name})
    audit.write(conn, actor=None, action="create", resource_type="capsule", resource_id="cap_1",
                team_id=team_id, actor_override=("user", user_id, name))
    if deleted is not None:
        conn.execute("UPDATE users SET deleted_at = now() - interval '15 days', is_active = false, "
                     "purge_after = now() + %s::interval WHERE id = %s", (deleted, user_id))
        conn.execute("UPDATE teams SET deleted_at = now() - interval '15 days' WHERE id = %s",
                     (team_id,))
        conn.execute("UPDATE api_keys SET deleted_at = now() WHERE created_by = %s", (user_id,))
    return {"id": user_id, "team_id": team_id, "email": email, "name": name}


def join(conn: Connection, user: dict[str, str], team: dict[str, str]) -> None:
    conn.execute("INSERT INTO team_members (team_id, user_id, role) VALUES (%s, %s, 'member')",
                 (team["team_id"], user["id"]))


def footprint(conn: Connection, user: dict[str, str]) -> dict[str, Any]:
    """What the database holds about ``user``."""
    uid, email = user["id"], user["email"]

    def count(query: str, *params: Any) -> int:
        row = conn.execute(query, params).fetchone()
        return int(row["n"]) if row else 0

    row = conn.execute("SELECT email, name, password_hash, purge_after, deleted_at FROM users "
                       "WHERE id = %s", (uid,)).fetchone()
    return {
        "user": dict(row) if row else None,
        "sessions": count("SELECT count(*) AS n FROM sessions WHERE user_id = %s", uid),
        "tokens": count("SELECT count(*) AS n FROM one_time_tokens WHERE user_id = %s", uid),
        "identities": count("SELECT count(*) AS n FROM oauth_identities WHERE user_id = %s", uid),
        "roles": sorted(r["role"] for r in conn.execute(
            "SELECT role FROM team_members WHERE user_id = %s", (uid,)).fetchall()),
        "outbox": count("SELECT count(*) AS n FROM outbox WHERE lower(to_addr) = %s", email),
        "limits": count("SELECT count(*) AS n FROM rate_limit_hits WHERE bucket LIKE %s",
                        f"%{email}"),
        "actor_names": sorted({r["actor_name"] for r in conn.execute(
            "SELECT actor_name FROM audit_log WHERE actor_id = %s", (uid,)).fetchall()}),
        "own_metadata": [r["metadata"] for r in conn.execute(
            "SELECT metadata FROM audit_log WHERE scope = 'user' AND resource_id = %s "
            "AND action <> 'purge'", (uid,)).fetchall()],
        "purge_entries": count("SELECT count(*) AS n FROM audit_log WHERE action = 'purge' "
                               "AND resource_id = %s AND actor_type = 'system'", uid),
    }


async def test_due_accounts_are_anonymized_and_their_rows_removed(auth_db: Database) -> None:
    def setup(conn: Connection) -> dict[str, dict[str, str]]:
        owner = add_user(conn, "Owner")
        gone = add_user(conn, "Gone", deleted="-1 minute")
        join(conn, gone, owner)  # a member of a team it does not own
        waiting = add_user(conn, "Waiting", deleted="+3 days")
        join(conn, waiting, owner)
        return {"owner": owner, "gone": gone, "waiting": waiting}

    users = await auth_db.transaction(setup)
    before = {name: await auth_db.transaction(functools.partial(footprint, user=u))
              for name, u in users.items()}

    assert await purge_due_accounts(auth_db) == 1

    gone = await auth_db.transaction(lambda c: footprint(c, users["gone"]))
    assert gone["user"]["email"] == "" and gone["user"]["name"] == PURGED_NAME
    assert gone["user"]["password_hash"] is None
    assert gone["user"]["purge_after"] is None and gone["user"]["deleted_at"] is not None
    assert gone["sessions"] == gone["tokens"] == gone["identities"] == 0
    assert gone["roles"] == ["owner"]  # its own (deleted) team keeps its owner; the membership went
    assert gone["outbox"] == before["gone"]["outbox"] - 1 == 0
    assert gone["limits"] == 0
    assert gone["actor_names"] == [PURGED_NAME]
    assert gone["own_metadata"] == [{}]
    assert gone["purge_entries"] == 1
    # Team-scope audit entries stay (by the anonymized actor).
    kept = await auth_db.fetchval("SELECT count(*) FROM audit_log WHERE actor_id = %s "
                                  "AND resource_type = 'capsule'", (users["gone"]["id"],))
    assert kept == 1

    # Not due yet, and live accounts: untouched.
    for name in ("owner", "waiting"):
        after = await auth_db.transaction(functools.partial(footprint, user=users[name]))
        assert after == before[name]
    owner_members = await auth_db.fetchval("SELECT count(*) FROM team_members WHERE team_id = %s",
                                           (users["owner"]["team_id"],))
    assert owner_members == 2  # the owner and the waiting member

    # A purged account is not picked again.
    assert await purge_due_accounts(auth_db) == 0
    assert await auth_db.transaction(lambda c: due_accounts(c)) == []


async def test_purge_account_skips_accounts_that_are_not_due(auth_db: Database) -> None:
    live, waiting = await auth_db.transaction(
        lambda c: (add_user(c, "Live"), add_user(c, "Later", deleted="+1 hour")))
    assert not await auth_db.transaction(lambda c: purge_account(c, live["id"]))
    assert not await auth_db.transaction(lambda c: purge_account(c, waiting["id"]))
    assert not await auth_db.transaction(lambda c: purge_account(c, "usr_missing"))
    assert await auth_db.fetchval("SELECT name FROM users WHERE id = %s", (live["id"],)) == "Live"


async def test_purge_runs_in_batches(auth_db: Database) -> None:
    await auth_db.transaction(lambda c: [add_user(c, f"Batch{i}", deleted="-1 hour")
                                         for i in range(5)])
    assert await purge_due_accounts(auth_db, limit=2) == 5
    assert await auth_db.fetchval("SELECT count(*) FROM users WHERE name = %s", (PURGED_NAME,)) == 5


async def test_the_purge_loop_purges_then_stops_when_the_service_stops(auth_db: Database) -> None:
    gone = await auth_db.transaction(lambda c: add_user(c, "Looped", deleted="-1 second"))
    ctx = SimpleNamespace(db=auth_db, config=SimpleNamespace(purge_interval_s=3600),
                          service=SimpleNamespace(stopping=trio.Event()))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_purge, ctx)
            query = "SELECT name FROM users WHERE id = %s"
            while await auth_db.fetchval(query, (gone["id"],)) != PURGED_NAME:  # noqa: ASYNC110 - a row has no event
                await trio.sleep(0.05)
            # Sleeping until the next round (an hour away): the stop ends it now.
            ctx.service.stopping.set()
