"""Group commit of the hot lease statements (``services/agents/batch.py``).

On a real PostgreSQL: statements queued together run as one transaction and
each waiter gets its own row; a failing statement makes the batch run one
statement at a time, so the others still apply, once, and the failing one's
waiter gets its own error; a waiter cancelled before its batch starts is
dropped from it. Over HTTP against ``dovecote up``: agents claiming and
completing at once (so their statements share batches) take each run once,
complete it once, and every claim and completion reaches the team's event
stream.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from psycopg import sql

from dovecote.libs.db import Database, open_database
from dovecote.libs.errors import DatabaseError, UniqueViolation
from dovecote.services.agents.batch import GroupCommit
from tests.agents.helpers import Agent, Operator
from tests.events.helpers import open_sse
from tests.helpers.suite import Suite

INSERT = "INSERT INTO t (id, v) VALUES (%(id)s, %(v)s) RETURNING id, v"


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[Database]:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE TABLE {}.t (id int PRIMARY KEY, v int)").format(sql.Identifier(schema)))
    try:
        async with open_database(postgres_url, schema=schema, max_size=2) as database:
            yield database
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def _queue_then_serve(group: GroupCommit, statements: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Queue every statement, then start the batcher: they share its first batch."""
    results: list[Any] = [None] * len(statements)

    async def one(i: int, query: str, params: dict[str, Any]) -> None:
        try:
            results[i] = await group.fetchone(query, params)
        except DatabaseError as exc:
            results[i] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as waiters:
                for i, (query, params) in enumerate(statements):
                    waiters.start_soon(one, i, query, params)
                    await trio.testing.wait_all_tasks_blocked()  # queued in this order
                outer.start_soon(group.serve)
            outer.cancel_scope.cancel()
    return results


async def test_a_batch_is_one_transaction_and_each_waiter_gets_its_row(db: Database) -> None:
    group = GroupCommit(db)
    results = await _queue_then_serve(group, [(INSERT, {"id": i, "v": i * 10}) for i in range(5)])
    assert results == [{"id": i, "v": i * 10} for i in range(5)]
    assert (group.batches, group.statements) == (1, 5)


async def test_a_failing_statement_fails_alone_and_the_others_apply_once(db: Database) -> None:
    group = GroupCommit(db)
    results = await _queue_then_serve(
        group,
        [
            (INSERT, {"id": 1, "v": 1}),
            (INSERT, {"id": 2, "v": 2}),
            (INSERT, {"id": 1, "v": 3}),  # the same key again: a unique violation
            ("SELECT 1 / %(zero)s AS v", {"zero": 0}),
            (INSERT, {"id": 3, "v": 4}),
        ],
    )
    assert results[0] == {"id": 1, "v": 1} and results[1] == {"id": 2, "v": 2}
    assert isinstance(results[2], UniqueViolation)
    assert isinstance(results[3], DatabaseError) and results[3].sqlstate == "22012"
    assert results[4] == {"id": 3, "v": 4}
    rows = await db.fetchall("SELECT id, v FROM t ORDER BY id")
    assert rows == [{"id": 1, "v": 1}, {"id": 2, "v": 2}, {"id": 3, "v": 4}]


async def test_a_waiter_cancelled_before_its_batch_is_dropped(db: Database) -> None:
    group = GroupCommit(db)
    with trio.move_on_after(0.05):
        await group.fetchone(INSERT, {"id": 7, "v": 7})  # nobody serves yet
    assert await _queue_then_serve(group, [(INSERT, {"id": 8, "v": 8})]) == [{"id": 8, "v": 8}]
    assert await db.fetchall("SELECT id FROM t") == [{"id": 8}]
    assert group.statements == 1


async def test_concurrent_claims_and_completions_apply_once_and_are_all_published(
    agents_suite: Suite,
) -> None:
    ops = Operator(agents_suite, "Batch")
    ws = ops.workspace()
    tasks = [ops.task(ws, f"batch {i}") for i in range(3)]
    runs = {ops.run(tasks[i % 3])["id"] for i in range(30)}
    agents = [ops.session(ws, f"agent-{i}") for i in range(12)]
    barrier = threading.Barrier(len(agents))
    done: dict[str, list[str]] = {a.id: [] for a in agents}
    problems: list[str] = []

    def work(agent: Agent) -> None:
        barrier.wait(timeout=30)
        while True:
            claim = agent.claim(lease_seconds=60)
            if claim.status_code == 204:
                return
            if claim.status_code != 200:
                problems.append(claim.text)
                return
            run_id = claim.json()["claim"]["run"]["id"]
            complete = agent.post(f"/api/agent/tasks/{run_id}/complete", {"result": {"by": agent.id}})
            if complete.status_code != 200 or complete.json()["lease"]["status"] != "completed":
                problems.append(complete.text)
                return
            done[agent.id].append(run_id)

    async def run_agents() -> None:
        async with trio.open_nursery() as nursery:
            for agent in agents:
                nursery.start_soon(trio.to_thread.run_sync, work, agent)

    with trio.fail_after(120):
        async with open_sse(agents_suite, cookies=ops.browser.http.cookies) as sse:
            assert (await sse.frame()).event == "connected"
            await run_agents()
            assert not problems, problems
            completed = [run_id for runs_of in done.values() for run_id in runs_of]
            assert sorted(completed) == sorted(runs)  # each run claimed and completed once
            for agent_id, runs_of in done.items():
                for run_id in runs_of:
                    run = ops.get(f"/v1/agent/runs/{run_id}")["run"]
                    assert run["status"] == "completed" and run["session_id"] == agent_id
            seen: dict[str, list[str]] = {"agent.task.claimed": [], "agent.task.completed": []}
            while sum(map(len, seen.values())) < 2 * len(runs):
                frame = await sse.frame()
                if frame.event in seen:
                    seen[frame.event].append(frame.data["metadata"]["run_id"])
            assert sorted(seen["agent.task.claimed"]) == sorted(runs)
            assert sorted(seen["agent.task.completed"]) == sorted(runs)
    for agent in agents:
        agent.close()
