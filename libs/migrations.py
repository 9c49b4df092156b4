"""Versioned SQL migrations, one history per service schema.

A service ships a folder of SQL files named ``NNNN_name.sql`` (``0001_init.sql``,
``0002_add_tokens.sql``; at least four digits, then ``[a-z0-9_]``), either as a
directory or as package data (``importlib.resources``). At start it calls::

    await apply_migrations(db, "auth", resources.files("dovecote.services.auth") / "migrations")

which, on one connection and under the session-level advisory lock
``pg_advisory_lock(hashtext('dovecote.migrate.' || schema))``:

1. creates the schema and ``<schema>.schema_migrations(version int primary key,
   name text, checksum text, applied_at timestamptz)`` if missing;
2. checks that every applied migration whose file still exists has the same
   SHA-256 checksum — an edited, already-applied migration raises
   :class:`~dovecote.libs.errors.MigrationError` (write a new migration instead);
3. applies the missing versions in ascending order, each in its own
   transaction together with its ``schema_migrations`` row, with
   ``search_path`` set to ``<schema>, public`` so unqualified names land in the
   schema.

The lock makes N processes starting at once safe: the first applies, the rest
wait and then find nothing to do. A version recorded in the database but
missing from the folder (the code is older than the database, e.g. during a
rolling deploy) is logged as a warning, not an error. Migration files may hold
several statements but must not use parameters or statements that cannot run
in a transaction (``CREATE INDEX CONCURRENTLY``, ``VACUUM``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TypeAlias

import psycopg
import trio
from psycopg import sql
from psycopg.rows import dict_row

from .db import Connection, Database, translate_error, validate_schema_name
from .errors import MigrationError
from .logs import get_logger

__all__ = ["Migration", "MigrationSource", "apply_migrations", "load_migrations"]

log = get_logger("dovecote.libs.migrations")

MigrationSource: TypeAlias = str | os.PathLike[str] | Traversable
_FILE_RE = re.compile(r"^(\d{4,})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: ``version`` and ``name`` come from ``NNNN_name.sql``."""

    version: int
    name: str
    sql: str
    checksum: str  # sha256 hex of the file's bytes


def load_migrations(source: MigrationSource) -> list[Migration]:
    """Read and validate the migration files of ``source``, sorted by version.

    ``source`` is a directory path, an ``importlib.resources`` Traversable, or a
    package name (``"dovecote.services.auth.migrations"``); a string that names
    an existing directory or contains a path separator is taken as a path.

    Raises:
        MigrationError: a ``.sql`` file is misnamed, two files share a version,
            or the source does not exist.
    """
    root = _resolve_source(source)
    if not root.is_dir():
        raise MigrationError(f"migrations folder not found: {source!r}")
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_RE.fullmatch(entry.name)
        if match is None:
            raise MigrationError(
                f"bad migration file name {entry.name!r}: expected NNNN_name.sql "
                "(digits, underscore, lower-case name)"
            )
        version = int(match.group(1))
        data = entry.read_bytes()
        if version in found:
            raise MigrationError(
                f"two migrations with version {version}: "
                f"{found[version].name!r} and {match.group(2)!r}"
            )
        found[version] = Migration(
            version=version,
            name=match.group(2),
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
    return [found[v] for v in sorted(found)]


async def apply_migrations(
    db_or_url: Database | str,
    schema: str,
    migrations: MigrationSource | Iterable[Migration],
) -> list[int]:
    """Bring ``schema`` up to date; return the versions applied by this call.

    Args:
        db_or_url: an open :class:`~dovecote.libs.db.Database` (one of its
            connections is used) or a connection URL (a dedicated connection is
            opened and closed).
        schema: the service schema to create and migrate.
        migrations: a source accepted by :func:`load_migrations`, or already
            loaded :class:`Migration` objects.

    Raises:
        MigrationError: a file changed after it was applied, a migration failed
            (its transaction is rolled back; earlier ones stay applied), or the
            files are invalid.
        DatabaseError: the database could not be reached.
    """
    validate_schema_name(schema)
    if isinstance(migrations, (str, os.PathLike, Traversable)):
        loaded = await trio.to_thread.run_sync(load_migrations, migrations)
    else:
        loaded = sorted(migrations, key=lambda m: m.version)

    def work(conn: Connection) -> list[int]:
        return _migrate(conn, schema, loaded)

    if isinstance(db_or_url, Database):
        return await db_or_url.run_with_connection(work)

    def standalone() -> list[int]:
        try:
            conn = psycopg.connect(db_or_url, autocommit=True, row_factory=dict_row)
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        with conn:
            return work(conn)

    return await trio.to_thread.run_sync(standalone)


def _resolve_source(source: MigrationSource) -> Traversable:
    if isinstance(source, Traversable):
        return source
    if isinstance(source, os.PathLike):
        return Path(source)
    if os.sep in source or Path(source).is_dir():
        return Path(source)
    try:
        return resources.files(source)
    except ModuleNotFoundError as exc:
        raise MigrationError(f"migrations package not found: {source!r}") from exc


def _migrate(conn: Connection, schema: str, migrations: list[Migration]) -> list[int]:
    lock_key = "dovecote.migrate." + schema
    ident = sql.Identifier(schema)
    table = sql.Identifier(schema, "schema_migrations")
    try:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [lock_key])
    except psycopg.Error as exc:
        raise translate_error(exc) from exc
    try:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} ("
                        " version integer PRIMARY KEY,"
                        " name text NOT NULL,"
                        " checksum text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    ).format(table)
                )
                rows = conn.execute(
                    sql.SQL("SELECT version, name, checksum FROM {} ORDER BY version").format(
                        table
                    )
                ).fetchall()
        except psycopg.Error as exc:
            raise MigrationError(f"cannot prepare migrations of schema {schema!r}: {exc}") from exc

        applied = {int(r["version"]): r for r in rows}
        by_version = {m.version: m for m in migrations}
        for version, row in applied.items():
            m = by_version.get(version)
            if m is None:
                log.warning(
                    "schema %s has migration %04d_%s applied that this code does not know",
                    schema, version, row["name"],
                )
            elif m.checksum != row["checksum"]:
                raise MigrationError(
                    f"migration {version:04d}_{m.name}.sql of schema {schema!r} was changed "
                    f"after it was applied (checksum {row['checksum'][:12]}… in the database, "
                    f"{m.checksum[:12]}… on disk); add a new migration instead of editing it"
                )

        done: list[int] = []
        for m in migrations:
            if m.version in applied:
                continue
            try:
                with conn.transaction():
                    conn.execute(
                        "SELECT set_config('search_path', %s, true)", [f"{schema}, public"]
                    )
                    conn.execute(m.sql.encode())
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {} (version, name, checksum) VALUES (%s, %s, %s)"
                        ).format(table),
                        [m.version, m.name, m.checksum],
                    )
            except psycopg.Error as exc:
                raise MigrationError(
                    f"migration {m.version:04d}_{m.name}.sql of schema {schema!r} failed: {exc}"
                ) from exc
            log.info("applied migration", extra={"schema": schema, "migration": f"{m.version:04d}_{m.name}"})
            done.append(m.version)
        return done
    finally:
        try:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [lock_key])
        except psycopg.Error as exc:
            # The session is broken; closing it releases the lock anyway.
            log.warning("could not release the migration lock", extra={"schema": schema, "error": str(exc)})
            if not conn.closed:
                conn.close()
