"""Migrations: ordered, idempotent, concurrent-safe, tamper-evident."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from psycopg import sql

from dovecote.libs.db import Database, open_database
from dovecote.libs.errors import MigrationError
from dovecote.libs.migrations import apply_migrations, load_migrations


def write_migrations(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "0001_init.sql").write_text(
        "CREATE TABLE events (id serial PRIMARY KEY, what text NOT NULL);\n"
        "CREATE TABLE counters (name text PRIMARY KEY, n int NOT NULL);\n"
    )
    # not idempotent: applying it twice would leave two rows
    (folder / "0002_seed.sql").write_text("INSERT INTO events (what) VALUES ('seeded');\n")
    (folder / "0003_more.sql").write_text(
        "ALTER TABLE events ADD COLUMN at timestamptz NOT NULL DEFAULT now();\n"
        "INSERT INTO counters VALUES ('applied_0003', 1);\n"
    )
    (folder / "README.md").write_text("not a migration\n")
    return folder


async def applied_versions(db: Database, schema: str) -> list[int]:
    query = sql.SQL("SELECT version FROM {} ORDER BY version").format(
        sql.Identifier(schema, "schema_migrations")
    )
    rows = await db.fetchall(query)
    return [r["version"] for r in rows]


async def test_migrations_apply_in_order_into_the_schema_and_are_idempotent(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    folder = write_migrations(tmp_path / "migrations")
    with trio.fail_after(20):
        async with open_database(postgres_url, schema=pg_schema) as db:
            assert await apply_migrations(db, pg_schema, folder) == [1, 2, 3]
            assert await apply_migrations(db, pg_schema, folder) == []
            assert await apply_migrations(postgres_url, pg_schema, folder) == []
            assert await applied_versions(db, pg_schema) == [1, 2, 3]
            assert await db.fetchval("SELECT count(*) FROM events") == 1
            row = await db.fetchone(
                sql.SQL("SELECT name, checksum, applied_at FROM {} WHERE version = 1").format(
                    sql.Identifier(pg_schema, "schema_migrations")
                )
            )
            assert row is not None
            assert row["name"] == "init"
            assert len(row["checksum"]) == 64
            assert row["applied_at"] is not None
            assert await db.fetchval(
                "SELECT count(*) FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_name = 'events'"
            ) == 0


async def test_new_migrations_are_applied_on_top(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    folder = write_migrations(tmp_path / "migrations")
    (folder / "0003_more.sql").rename(tmp_path / "later.sql")
    with trio.fail_after(20):
        assert await apply_migrations(postgres_url, pg_schema, folder) == [1, 2]
        (tmp_path / "later.sql").rename(folder / "0003_more.sql")
        assert await apply_migrations(postgres_url, pg_schema, folder) == [3]


async def test_concurrent_callers_apply_each_migration_exactly_once(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    folder = write_migrations(tmp_path / "migrations")
    (folder / "0002_seed.sql").write_text(
        "INSERT INTO events (what) VALUES ('seeded');\nSELECT pg_sleep(0.2);\n"
    )
    results: list[list[int]] = []

    async def migrate_from_own_pool() -> None:
        async with open_database(postgres_url, schema=pg_schema, max_size=1) as db:
            results.append(await apply_migrations(db, pg_schema, folder))

    async def migrate_from_url() -> None:
        results.append(await apply_migrations(postgres_url, pg_schema, folder))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(migrate_from_own_pool)
            for _ in range(2):
                nursery.start_soon(migrate_from_url)
        assert sorted(results) == [[], [], [], [], [1, 2, 3]]
        async with open_database(postgres_url, schema=pg_schema) as db:
            assert await applied_versions(db, pg_schema) == [1, 2, 3]
            assert await db.fetchval("SELECT count(*) FROM events") == 1
            assert await db.fetchval("SELECT n FROM counters") == 1


async def test_changed_checksum_of_an_applied_migration_raises(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    folder = write_migrations(tmp_path / "migrations")
    with trio.fail_after(20):
        await apply_migrations(postgres_url, pg_schema, folder)
        (folder / "0002_seed.sql").write_text("INSERT INTO events (what) VALUES ('edited');\n")
        (folder / "0004_never.sql").write_text("CREATE TABLE never (x int);\n")
        with pytest.raises(MigrationError, match=r"0002_seed\.sql .*changed"):
            await apply_migrations(postgres_url, pg_schema, folder)
        async with open_database(postgres_url, schema=pg_schema) as db:
            # nothing newer was applied after the mismatch, and the lock was released
            assert await applied_versions(db, pg_schema) == [1, 2, 3]
            assert await db.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            ) == 0


async def test_failing_migration_rolls_back_and_keeps_earlier_ones(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    folder = write_migrations(tmp_path / "migrations")
    (folder / "0004_broken.sql").write_text(
        "CREATE TABLE half (x int);\nSELECT * FROM does_not_exist;\n"
    )
    with trio.fail_after(20):
        with pytest.raises(MigrationError, match="0004_broken"):
            await apply_migrations(postgres_url, pg_schema, folder)
        async with open_database(postgres_url, schema=pg_schema) as db:
            assert await applied_versions(db, pg_schema) == [1, 2, 3]
            assert await db.fetchval("SELECT to_regclass('half')") is None


async def test_migrations_load_from_a_package(
    postgres_url: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "pkgroot" / "fake_service_migrations"
    write_migrations(package)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    with trio.fail_after(20):
        assert await apply_migrations(postgres_url, pg_schema, "fake_service_migrations") == [
            1,
            2,
            3,
        ]


def test_misnamed_or_duplicate_migration_files_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "1_init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="bad migration file name"):
        load_migrations(bad)
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "0001_a.sql").write_text("SELECT 1;")
    (dup / "0001_b.sql").write_text("SELECT 2;")
    with pytest.raises(MigrationError, match="two migrations with version 1"):
        load_migrations(dup)
    with pytest.raises(MigrationError, match="not found"):
        load_migrations(tmp_path / "missing")
