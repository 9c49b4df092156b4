"""PostgreSQL access for Trio services: one pool per service, one schema per service.

psycopg's async API is asyncio-only, so under Trio we use the *sync*
``psycopg_pool.ConnectionPool`` and run every database call in a worker
thread, bounded by a ``trio.CapacityLimiter`` sized like the pool (a thread
waiting for a pooled connection would otherwise just sit in the pool queue).

Connections are in autocommit mode: ``execute``/``fetch*`` are one statement,
one transaction. Multi-statement work goes through :meth:`Database.transaction`,
which runs a plain sync function ``fn(conn)`` in one worker thread inside
``BEGIN … COMMIT`` (rolled back if ``fn`` raises). Rows are dicts
(``psycopg.rows.dict_row``). Every connection's ``search_path`` is
``<schema>, public``, so a service writes unqualified table names and they land
in its own schema.

Cancellation: a cancelled call does not abandon its thread (the pool must
never be closed under a running query). Instead the running statement is
cancelled server-side (``conn.cancel_safe()``, from a helper thread so Trio's
loop never blocks), the worker returns promptly with ``QueryCanceled``, and
the caller sees ``trio.Cancelled``. A call that completed before the cancel
arrived returns its result; the next checkpoint raises ``Cancelled``.

Errors: every psycopg error becomes a :class:`~dovecote.libs.errors.DatabaseError`
(``.sqlstate`` set), unique violations a
:class:`~dovecote.libs.errors.UniqueViolation` (``.constraint`` set) so
handlers can answer 409. Inside ``transaction(fn)`` the function sees raw
psycopg exceptions; they are translated when they leave ``transaction``.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, LiteralString, TypeAlias, TypeVar

import outcome
import psycopg
import psycopg.errors
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import DatabaseError, UniqueViolation

__all__ = [
    "Connection",
    "Database",
    "Params",
    "Query",
    "open_database",
    "schema_identifier",
    "translate_error",
    "validate_schema_name",
]

T = TypeVar("T")
Connection: TypeAlias = psycopg.Connection[DictRow]
Params: TypeAlias = Sequence[Any] | Mapping[str, Any] | None
Query: TypeAlias = LiteralString | bytes | sql.SQL | sql.Composed

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def validate_schema_name(schema: str) -> str:
    """Return ``schema`` if it is a plain lower-case identifier, else raise ValueError.

    Schema names go into ``search_path`` and advisory-lock keys, so only
    ``[a-z_][a-z0-9_]*`` (at most 63 characters) is accepted.
    """
    if not _SCHEMA_RE.fullmatch(schema) or schema.startswith("pg_"):
        raise ValueError(f"invalid schema name {schema!r}")
    return schema


def translate_error(exc: BaseException) -> DatabaseError:
    """Map a psycopg (or pool) exception to Dovecote's exception tree."""
    if isinstance(exc, DatabaseError):
        return exc
    if isinstance(exc, psycopg.errors.UniqueViolation):
        constraint = exc.diag.constraint_name
        return UniqueViolation(
            f"unique violation on {constraint or 'unknown constraint'}: {exc}",
            constraint=constraint,
        )
    if isinstance(exc, PoolTimeout):
        return DatabaseError(f"no database connection available: {exc}")
    if isinstance(exc, psycopg.Error):
        return DatabaseError(str(exc) or type(exc).__name__, sqlstate=exc.sqlstate)
    return DatabaseError(f"{type(exc).__name__}: {exc}")


class _Call:
    """Shared state between one awaiting Trio task and its worker thread."""

    __slots__ = ("cancel_requested", "conn", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: Connection | None = None
        self.cancel_requested = False

    def cancel_running_statement(self) -> None:  # runs in a helper thread
        with self.lock:
            conn = self.conn
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.cancel_safe(timeout=10)


class _CancelledBeforeStart(Exception):
    pass


class Database:
    """A connection pool bound to one service schema. Create it with :func:`open_database`."""

    def __init__(self, pool: ConnectionPool[Connection], schema: str, max_size: int) -> None:
        self._pool = pool
        self.schema = schema
        self._limiter = trio.CapacityLimiter(max_size)
        self._checkout_timeout = 30.0

    @property
    def pool(self) -> ConnectionPool[Connection]:
        """The underlying sync pool (for statistics; do not call it from Trio)."""
        return self._pool

    def statistics(self) -> dict[str, int]:
        """Return the pool's statistics (``pool_size``, ``pool_available``, ...)."""
        return dict(self._pool.get_stats())

    async def execute(self, query: Query, params: Params = None) -> int:
        """Run one statement; return the number of affected rows (-1 if not applicable)."""

        def work(conn: Connection) -> int:
            cur = conn.execute(query, params)
            return cur.rowcount

        return await self.run_with_connection(work)

    async def fetchone(self, query: Query, params: Params = None) -> dict[str, Any] | None:
        """Run a query and return its first row as a dict, or None if there is none."""

        def work(conn: Connection) -> dict[str, Any] | None:
            return conn.execute(query, params).fetchone()

        return await self.run_with_connection(work)

    async def fetchall(self, query: Query, params: Params = None) -> list[dict[str, Any]]:
        """Run a query and return all rows as dicts."""

        def work(conn: Connection) -> list[dict[str, Any]]:
            return list(conn.execute(query, params).fetchall())

        return await self.run_with_connection(work)

    async def fetchval(self, query: Query, params: Params = None) -> Any:
        """Run a query and return the first column of its first row, or None."""

        def work(conn: Connection) -> Any:
            row = conn.execute(query, params).fetchone()
            if row is None:
                return None
            return next(iter(row.values()))

        return await self.run_with_connection(work)

    async def transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run the sync ``fn(conn)`` in one transaction in a worker thread.

        ``fn`` receives a psycopg connection (dict rows, autocommit off for the
        duration) and may run any number of statements; the transaction commits
        when ``fn`` returns and rolls back if it raises. ``fn`` must not touch
        Trio. psycopg errors leaving ``fn`` are translated to ``DatabaseError``;
        any other exception propagates unchanged.

        Example::

            def transfer(conn):
                conn.execute("UPDATE accounts SET credit = credit - %s WHERE id = %s", (5, a))
                conn.execute("UPDATE accounts SET credit = credit + %s WHERE id = %s", (5, b))

            await db.transaction(transfer)
        """

        def work(conn: Connection) -> T:
            with conn.transaction():
                return fn(conn)

        return await self.run_with_connection(work)

    async def run_with_connection(self, fn: Callable[[Connection], T]) -> T:
        """Run the sync ``fn(conn)`` with a pooled autocommit connection in a worker thread.

        The building block of every other method; use it directly for session
        features (advisory locks, ``COPY``). ``fn`` must leave the connection
        idle (no open transaction) and the session state as it found it.
        """
        call = _Call()
        pool = self._pool
        ctx = contextvars.copy_context()

        def worker() -> T:
            with pool.connection(timeout=self._checkout_timeout) as conn:
                with call.lock:
                    if call.cancel_requested:
                        raise _CancelledBeforeStart
                    call.conn = conn
                try:
                    return ctx.run(fn, conn)
                finally:
                    with call.lock:
                        call.conn = None

        async with self._limiter:
            task = trio.lowlevel.current_task()
            token = trio.lowlevel.current_trio_token()

            def deliver(result: outcome.Outcome[T]) -> None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(trio.lowlevel.reschedule, task, result)

            def abort(_: Any) -> trio.lowlevel.Abort:
                call.cancel_requested = True
                trio.lowlevel.start_thread_soon(
                    call.cancel_running_statement, lambda _: None, name="db-cancel"
                )
                return trio.lowlevel.Abort.FAILED  # keep waiting for the worker

            # Unnamed: a named job renames the OS thread twice per statement (two system calls).
            trio.lowlevel.start_thread_soon(worker, deliver)
            try:
                result: T = await trio.lowlevel.wait_task_rescheduled(abort)
            except BaseException as exc:
                if call.cancel_requested:
                    # The failure is (most likely) our own cancel request, in
                    # whatever shape fn wrapped it: report the cancellation.
                    await trio.lowlevel.checkpoint()
                if isinstance(exc, (psycopg.Error, PoolTimeout, _CancelledBeforeStart)):
                    raise translate_error(exc) from exc
                raise
            return result

    async def aclose(self) -> None:
        """Close the pool (waits for connections in use, bounded by a few seconds)."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._pool.close, 5.0)


@contextlib.asynccontextmanager
async def open_database(
    url: str,
    *,
    schema: str,
    min_size: int = 1,
    max_size: int = 8,
    open_timeout: float = 30.0,
    application_name: str | None = None,
) -> AsyncIterator[Database]:
    """Open a connection pool whose connections use ``schema`` first in ``search_path``.

    The schema itself is not created here (migrations do that); until it exists
    unqualified names resolve in ``public``.

    Args:
        url: a libpq URL or conninfo string (``postgresql://...``).
        schema: the service's schema, a plain lower-case identifier.
        min_size: connections kept open.
        max_size: most connections (and concurrent worker threads).
        open_timeout: seconds to wait for the first ``min_size`` connections.
        application_name: shown in ``pg_stat_activity``; defaults to ``dovecote.<schema>``.

    Raises:
        DatabaseError: the database is unreachable within ``open_timeout``.
        ValueError: ``schema`` is not a valid schema name.

    The pool is closed when the block exits, also on error or cancellation.
    """
    validate_schema_name(schema)
    params = conninfo_to_dict(url)
    options = str(params.get("options") or "")
    options = f"{options} -c search_path={schema},public".strip()
    conninfo = make_conninfo(
        url,
        options=options,
        application_name=application_name or params.get("application_name") or f"dovecote.{schema}",
    )
    pool: ConnectionPool[Connection] = ConnectionPool(
        conninfo,
        kwargs={"autocommit": True, "row_factory": dict_row},
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=f"dovecote.{schema}",
    )
    try:
        await trio.to_thread.run_sync(lambda: pool.open(wait=True, timeout=open_timeout))
    except (psycopg.Error, PoolTimeout) as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pool.close, 1.0)
        raise translate_error(exc) from exc
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pool.close, 1.0)
        raise
    db = Database(pool, schema, max_size)
    try:
        yield db
    finally:
        await db.aclose()


def schema_identifier(schema: str) -> sql.Identifier:
    """Return ``schema`` validated and quoted for composing SQL."""
    return sql.Identifier(validate_schema_name(schema))
