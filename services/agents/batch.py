"""Group commit for the hot lease statements (claim-next, a holder's heartbeat/complete/fail/release).

Each of those is one SQL statement (:mod:`.leasesql`). Run alone, each costs
a worker-thread hop, a round trip to PostgreSQL and a commit (a WAL flush).
With many agents at work, requests arrive together: :class:`GroupCommit`
queues them and one task runs what is queued as one batch — one thread hop,
the statements pipelined (psycopg pipeline mode: sent back to back, one
network round trip) in one transaction, so one commit — and hands each
waiter its own row. While a batch runs the next one gathers; nothing waits
on purpose, so a lone agent's statement goes at once, as a batch of one.

Correctness is the statements' own: inside one transaction a statement sees
the ones before it, so two claims of one batch never pick the same run (the
first one's run is no longer ``queued``), and ``FOR UPDATE SKIP LOCKED``
keeps other transactions off the rows the batch holds; a holder's change is
fenced on the row as before. One batch runs at a time, so batches never
wait on each other's locks.

A failing statement aborts the whole transaction: the batch is then run
again one statement at a time (each its own transaction, in autocommit), so
each waiter gets its own row or its own error, and no statement is applied
twice (the failed transaction applied none). A waiter cancelled before its
batch starts is dropped from it; once its batch runs, the statement takes
effect like one whose caller hung up (a claim nobody heard of expires and
the sweeper requeues it).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import outcome
import psycopg
import trio
from prometheus_client import Counter

from dovecote.libs.db import Connection, Database, Query, translate_error
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.agents.batch")

MAX_BATCH = 64
"""Most statements in one transaction."""
BATCHES = Counter("dovecote_agents_lease_batches", "Batches of lease statements run (one transaction each).")
STATEMENTS = Counter("dovecote_agents_lease_statements", "Lease statements run in batches.")


class _Pending:
    __slots__ = ("done", "params", "query", "result", "taken")

    def __init__(self, query: Query, params: Mapping[str, Any]) -> None:
        self.query = query
        self.params = params
        self.done = trio.Event()
        self.taken = False
        self.result: outcome.Outcome[dict[str, Any] | None] | None = None


def _run_batch(conn: Connection, batch: list[_Pending]) -> list[outcome.Outcome[dict[str, Any] | None]]:
    """Run ``batch`` in one pipelined transaction; one statement at a time if that fails."""
    if len(batch) == 1:  # alone: in autocommit, as it would have run without the batcher
        try:
            return [outcome.Value(conn.execute(batch[0].query, batch[0].params).fetchone())]
        except psycopg.Error as exc:
            return [outcome.Error(translate_error(exc))]
    try:
        with conn.pipeline():
            with conn.transaction():
                cursors = [conn.execute(p.query, p.params) for p in batch]
        return [outcome.Value(cur.fetchone()) for cur in cursors]
    except psycopg.Error as exc:
        log.info("a batch of lease statements failed; running them one by one", extra={"error": repr(exc)})
    results: list[outcome.Outcome[dict[str, Any] | None]] = []
    for p in batch:
        try:
            results.append(outcome.Value(conn.execute(p.query, p.params).fetchone()))
        except psycopg.Error as exc:
            results.append(outcome.Error(translate_error(exc)))
    return results


class GroupCommit:
    """Runs single-statement queries that arrive together in one transaction (see the module doc)."""

    def __init__(self, db: Database, *, max_batch: int = MAX_BATCH) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: list[_Pending] = []
        self._wake = trio.Event()
        self.batches = 0
        self.statements = 0

    async def fetchone(self, query: Query, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first row of ``query`` (one statement), run in the next batch."""
        item = _Pending(query, params)
        self._queue.append(item)
        self._wake.set()
        try:
            await item.done.wait()
        except trio.Cancelled:
            if not item.taken:
                self._queue.remove(item)
            raise
        assert item.result is not None
        return item.result.unwrap()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the queued statements, a batch at a time, forever."""
        task_status.started()
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            for item in batch:
                item.taken = True
            try:
                results = await self.db.run_with_connection(functools.partial(_run_batch, batch=batch))
            except Exception as exc:  # no connection, or the database went away: each waiter hears it
                results = [outcome.Error(translate_error(exc)) for _ in batch]
            self.batches += 1
            self.statements += len(batch)
            BATCHES.inc()
            STATEMENTS.inc(len(batch))
            for item, result in zip(batch, results, strict=True):
                item.result = result
                item.done.set()
