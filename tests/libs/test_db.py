"""Database: queries through the pool from Trio, errors, transactions, cancellation."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
import trio

from dovecote.libs.db import Connection, Database, open_database
from dovecote.libs.errors import DatabaseError, DovecoteError, UniqueViolation


async def test_queries_return_dict_rows_in_the_service_schema(
    database: Database, pg_schema: str
) -> None:
    with trio.fail_after(10):
        await database.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
        inserted = await database.execute(
            "INSERT INTO items (id, name) VALUES (%s, %s), (%s, %s)", (1, "a", 2, "b")
        )
        assert inserted == 2
        assert await database.fetchone("SELECT * FROM items WHERE id = %s", (1,)) == {
            "id": 1,
            "name": "a",
        }
        assert await database.fetchone("SELECT * FROM items WHERE id = %s", (99,)) is None
        rows = await database.fetchall("SELECT id, name FROM items ORDER BY id")
        assert rows == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
        assert await database.fetchval("SELECT count(*) FROM items") == 2
        assert await database.fetchval("SELECT name FROM items WHERE id = %(id)s", {"id": 2}) == "b"
        assert await database.fetchval("SELECT 1 WHERE false") is None
        # unqualified names landed in the service schema, not in public
        assert await database.fetchval(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'items'"
        ) == pg_schema
        assert await database.fetchval("SELECT current_schema()") == pg_schema


async def test_unique_violation_names_the_constraint(database: Database) -> None:
    with trio.fail_after(10):
        await database.execute(
            "CREATE TABLE users (id int PRIMARY KEY, email text CONSTRAINT users_email_key UNIQUE)"
        )
        await database.execute("INSERT INTO users VALUES (1, 'a@example.com')")
        with pytest.raises(UniqueViolation) as info:
            await database.execute("INSERT INTO users VALUES (2, 'a@example.com')")
        assert info.value.constraint == "users_email_key"
        assert info.value.sqlstate == "23505"
        assert isinstance(info.value, DatabaseError)
        assert isinstance(info.value.__cause__, psycopg.errors.UniqueViolation)


async def test_sql_errors_become_database_errors_and_the_pool_recovers(
    database: Database,
) -> None:
    with trio.fail_after(10):
        with pytest.raises(DatabaseError) as info:
            await database.fetchall("SELECT * FROM no_such_table")
        assert info.value.sqlstate == "42P01"
        assert isinstance(info.value, DovecoteError)
        assert await database.fetchval("SELECT 41 + 1") == 42


async def test_transaction_commits_all_or_nothing(database: Database) -> None:
    with trio.fail_after(10):
        await database.execute("CREATE TABLE accounts (id int PRIMARY KEY, credit int NOT NULL)")
        await database.execute("INSERT INTO accounts VALUES (1, 10), (2, 0)")

        def transfer(conn: Connection) -> int:
            conn.execute("UPDATE accounts SET credit = credit - 5 WHERE id = 1")
            conn.execute("UPDATE accounts SET credit = credit + 5 WHERE id = 2")
            row = conn.execute("SELECT sum(credit) AS total FROM accounts").fetchone()
            assert row is not None
            return int(row["total"])

        assert await database.transaction(transfer) == 10

        class Boom(Exception):
            pass

        def half_then_fail(conn: Connection) -> None:
            conn.execute("UPDATE accounts SET credit = 0 WHERE id = 1")
            raise Boom

        with pytest.raises(Boom):
            await database.transaction(half_then_fail)

        def duplicate(conn: Connection) -> None:
            conn.execute("UPDATE accounts SET credit = 0 WHERE id = 2")
            conn.execute("INSERT INTO accounts VALUES (1, 1)")

        with pytest.raises(UniqueViolation):
            await database.transaction(duplicate)

        rows = await database.fetchall("SELECT id, credit FROM accounts ORDER BY id")
        assert rows == [{"id": 1, "credit": 5}, {"id": 2, "credit": 5}]


async def test_pool_serves_many_concurrent_trio_tasks_with_bounded_connections(
    database: Database,
) -> None:
    # max_size=4 in the fixture: 40 tasks each holding a connection for 50 ms
    await database.execute("CREATE TABLE hits (task int, n int)")
    results: list[Any] = []

    async def worker(i: int) -> None:
        await database.execute("INSERT INTO hits VALUES (%s, 1)", (i,))
        pid = await database.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.05)")
        results.append(pid)

    started = time.monotonic()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(worker, i)
    elapsed = time.monotonic() - started
    assert await database.fetchval("SELECT count(DISTINCT task) FROM hits") == 40
    assert len(results) == 40
    assert len(set(results)) <= 4  # never more backends than the pool's max_size
    assert elapsed >= 40 * 0.05 / 4 * 0.9  # really limited to 4 at a time
    assert database.statistics()["pool_max"] == 4


async def test_cancelling_a_query_cancels_it_on_the_server(database: Database) -> None:
    with trio.fail_after(10):
        started = time.monotonic()
        with trio.move_on_after(0.3) as scope:
            await database.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert time.monotonic() - started < 5
        # the connection went back to the pool in a usable state
        assert await database.fetchval("SELECT 1") == 1
        active = await database.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
            " AND state = 'active'"
        )
        assert active == 0


async def test_pool_is_closed_when_the_block_is_cancelled(
    postgres_url: str, pg_schema: str
) -> None:
    with trio.fail_after(10):
        with trio.move_on_after(0.5):
            async with open_database(postgres_url, schema=pg_schema) as db:
                pool = db.pool
                await db.execute("SELECT pg_sleep(10)")
        assert pool.closed


async def test_unreachable_database_raises_database_error(tmp_path: Any) -> None:
    url = f"postgresql://postgres@/x?host={tmp_path}&port=1&connect_timeout=1"
    with trio.fail_after(10), pytest.raises(DatabaseError):
        async with open_database(url, schema="s", open_timeout=1):
            pass


async def test_invalid_schema_name_is_rejected(postgres_url: str) -> None:
    with pytest.raises(ValueError, match="invalid schema"):
        async with open_database(postgres_url, schema="x; DROP TABLE users"):
            pass
