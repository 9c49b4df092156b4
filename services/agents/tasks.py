"""Tasks, runs and their leases (``tasks``, ``runs``).

A run is created ``queued`` (with its coordination channel). ``claim-next``
takes the best queued run of the caller's workspace — highest priority, then
oldest — that the session may work on (its capabilities cover the task's,
its ``network_channels`` permission the run's channel), in one statement with
``FOR UPDATE SKIP LOCKED``: concurrent claimers skip each other's rows, so a
run is claimed once. The claim token is random; only its sha256 is stored
and answered (``claim_token_hash``). Later mutations go through
:func:`.lease.decide` on the locked row, and the update is fenced on the
token hash it read. The sweeper applies :func:`.lease.plan_sweep`.

Task status follows its latest run: ``draft`` (no run) → ``ready`` (queued)
→ ``in_progress`` (claimed) → ``completed`` / ``failed``.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio
from psycopg.types.json import Jsonb

from dovecote.bus.messages import agents as m
from dovecote.libs.db import Connection
from dovecote.libs.errors import UniqueViolation
from dovecote.libs.logs import get_logger
from dovecote.services.agents import lease as L
from dovecote.services.agents import leasesql, views
from dovecote.services.agents.core import (
    CLAIM_TOKEN_PREFIX,
    Agents,
    agent_ref,
    at,
    audit,
    epoch,
    find_claim_token,
    new_id,
    new_secret,
    operator_ref,
    sha256_hex,
)
from dovecote.services.agents.errors import BadRequest, LeaseConflict, NotFound, Unprocessable
from dovecote.services.agents.identity import Identity
from dovecote.services.agents.lineage import ANY
from dovecote.services.agents.sessions import SYSTEM
from dovecote.services.agents.workspaces import check_name

log = get_logger("dovecote.agents.tasks")

TASK_FOR_OUTCOME = {"claimed": "in_progress", "completed": "completed", "failed": "failed", "queued": "ready"}
EVENT_FOR_ACTION = {
    "complete": "agent.task.completed",
    "fail": "agent.task.failed",
    "release": "agent.task.released",
}


def _channel_of(conn: Connection, channel_id: str) -> m.Channel:
    row = conn.execute("SELECT * FROM channels WHERE id = %s", (channel_id,)).fetchone()
    assert row is not None
    return views.channel(row)


class Tasks:
    def __init__(self, agents: Agents, identity: Identity) -> None:
        self.agents = agents
        self.identity = identity

    def register(self, handle: Any) -> None:
        handle(m.CreateTask, self.create)
        handle(m.ListTasks, self.list_tasks)
        handle(m.GetTask, self.get)
        handle(m.QueueRun, self.queue_run)
        handle(m.GetRun, self.get_run)
        handle(m.ClaimNext, self.claim_next)
        handle(m.ChangeLease, self.change_lease)

    # -- operator -----------------------------------------------------------------

    async def create(self, msg: m.CreateTask) -> m.TaskReply:
        check_name(msg.title, "title", 300)
        if len(msg.description) > 20_000 or len(msg.network_channel) > 200:
            raise BadRequest("description or network_channel is too long")
        if len(msg.required_capabilities) > 64 or any(
            not c or len(c) > 100 for c in msg.required_capabilities
        ):
            raise BadRequest("required_capabilities: at most 64 names of 1..100 characters")
        team, actor = msg.actor.team_id, operator_ref(msg.actor)

        def work(conn: Connection) -> dict[str, Any]:
            ws = conn.execute(
                "UPDATE workspaces SET task_seq = task_seq + 1 WHERE id = %s AND team_id = %s "
                "RETURNING task_seq",
                (msg.workspace_id, team),
            ).fetchone()
            if ws is None:
                raise NotFound("no such workspace", code="workspace_not_found")
            row = conn.execute(
                "INSERT INTO tasks (id, team_id, workspace_id, identifier, title, description, "
                "priority, status, "
                "  network_channel, required_capabilities, owner_kind, owner_ref) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, 'draft', %s, %s, %s, %s) RETURNING *",
                (
                    new_id("tsk_"),
                    team,
                    msg.workspace_id,
                    f"T-{ws['task_seq']}",
                    msg.title,
                    msg.description,
                    msg.priority,
                    msg.network_channel,
                    sorted(set(msg.required_capabilities)),
                    actor.kind,
                    actor.ref,
                ),
            ).fetchone()
            assert row is not None
            audit(conn, team, actor, "task.create", "task", row["id"], {"workspace_id": msg.workspace_id})
            return row

        row = await self.agents.db.transaction(work)
        self.agents.events.emit(
            team,
            "agent.task.created",
            "agent_task",
            row["id"],
            actor,
            {"workspace_id": row["workspace_id"], "title": row["title"][:200]},
        )
        return m.TaskReply(task=views.task(row))

    async def list_tasks(self, msg: m.ListTasks) -> m.TasksReply:
        rows = await self.agents.db.fetchall(
            "SELECT * FROM tasks WHERE team_id = %s AND (%s = '' OR workspace_id = %s) "
            "ORDER BY created_at, id LIMIT 1000",
            (msg.actor.team_id, msg.workspace_id, msg.workspace_id),
        )
        return m.TasksReply(tasks=[views.task(r) for r in rows])

    async def get(self, msg: m.GetTask) -> m.TaskReply:
        row = await self.agents.db.fetchone(
            "SELECT * FROM tasks WHERE id = %s AND team_id = %s", (msg.task_id, msg.actor.team_id)
        )
        if row is None:
            raise NotFound("no such task", code="task_not_found")
        runs = await self.agents.db.fetchall(
            "SELECT * FROM runs WHERE task_id = %s AND team_id = %s ORDER BY queued_at, id",
            (msg.task_id, msg.actor.team_id),
        )
        return m.TaskReply(task=views.task(row), runs=[views.run(r) for r in runs])

    async def queue_run(self, msg: m.QueueRun) -> m.RunReply:
        if msg.idempotency_key is not None and not 0 < len(msg.idempotency_key) <= 200:
            raise BadRequest("idempotency_key must be 1..200 characters")
        if msg.max_attempts is not None and not 1 <= msg.max_attempts <= 100:
            raise BadRequest("max_attempts must be in 1..100")
        team, actor = msg.actor.team_id, operator_ref(msg.actor)

        def work(conn: Connection) -> tuple[dict[str, Any], m.Channel, bool]:
            task = conn.execute(
                "SELECT * FROM tasks WHERE id = %s AND team_id = %s FOR UPDATE", (msg.task_id, team)
            ).fetchone()
            if task is None:
                raise NotFound("no such task", code="task_not_found")
            if msg.idempotency_key is not None:
                same = conn.execute(
                    "SELECT * FROM runs WHERE task_id = %s AND idempotency_key = %s",
                    (msg.task_id, msg.idempotency_key),
                ).fetchone()
                if same is not None:
                    return same, _channel_of(conn, same["coordination_channel_id"]), False
            run_id = new_id("run_")
            chan = conn.execute(
                "INSERT INTO channels (id, team_id, workspace_id, channel, display_name, purpose, "
                "task_id, run_id, "
                "  allowed_message_kinds) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
                (
                    new_id("ch_"),
                    team,
                    task["workspace_id"],
                    f"run-{run_id}",
                    f"{task['identifier']} run",
                    f"Coordination of run {run_id} of task {task['identifier']}",
                    task["id"],
                    run_id,
                    list(m.MESSAGE_KINDS),
                ),
            ).fetchone()
            assert chan is not None
            row = conn.execute(
                "INSERT INTO runs (id, team_id, workspace_id, task_id, status, priority_rank, max_attempts, "
                "  idempotency_key, network_channel, required_capabilities, coordination_channel_id, "
                "  origin_kind, origin_ref) "
                "VALUES (%s, %s, %s, %s, 'queued', %s, %s, %s, %s, %s, %s, 'api', %s) RETURNING *",
                (
                    run_id,
                    team,
                    task["workspace_id"],
                    task["id"],
                    m.PRIORITY_RANK[task["priority"]],
                    msg.max_attempts or self.agents.config.agents_max_attempts,
                    msg.idempotency_key,
                    task["network_channel"] if msg.network_channel is None else msg.network_channel,
                    task["required_capabilities"],
                    chan["id"],
                    actor.ref,
                ),
            ).fetchone()
            assert row is not None
            conn.execute("UPDATE tasks SET status = 'ready', updated_at = now() WHERE id = %s", (task["id"],))
            audit(conn, team, actor, "run.queue", "run", run_id, {"task_id": task["id"]})
            return row, views.channel(chan), True

        try:
            row, chan, created = await self.agents.db.transaction(work)
        except UniqueViolation:
            again = await self.agents.db.fetchone(
                "SELECT * FROM runs WHERE task_id = %s AND idempotency_key = %s AND team_id = %s",
                (msg.task_id, msg.idempotency_key, team),
            )
            if again is None:
                raise
            row = again
            chan_row = await self.agents.db.fetchone(
                "SELECT * FROM channels WHERE id = %s", (row["coordination_channel_id"],)
            )
            assert chan_row is not None
            chan, created = views.channel(chan_row), False
        if created:
            self.agents.work_wakeups.fire(row["workspace_id"])
            self.agents.events.emit(
                team,
                "agent.task.queued",
                "agent_task",
                row["task_id"],
                actor,
                {"run_id": row["id"], "workspace_id": row["workspace_id"]},
            )
        return m.RunReply(run=views.run(row, chan))

    async def get_run(self, msg: m.GetRun) -> m.RunReply:
        row = await self.agents.db.fetchone(
            "SELECT * FROM runs WHERE id = %s AND team_id = %s", (msg.run_id, msg.actor.team_id)
        )
        if row is None:
            raise NotFound("no such run", code="run_not_found")
        chan = await self.agents.db.fetchone(
            "SELECT * FROM channels WHERE id = %s", (row["coordination_channel_id"],)
        )
        return m.RunReply(run=views.run(row, views.channel(chan) if chan else None))

    # -- agent ---------------------------------------------------------------------

    async def claim_next(self, msg: m.ClaimNext) -> m.ClaimReply:
        me = await self.identity.resolve(msg.identity)
        c = self.agents.config
        seconds = L.lease_seconds(
            msg.lease_seconds, default=c.agents_lease_default_s, maximum=c.agents_lease_max_s
        )
        deadline = trio.current_time() + self.agents.wait_bound(msg.wait_s)
        nets = list(me["permission_policy"].get("network_channels", []))
        while True:
            wake = self.agents.work_wakeups.event(me["workspace_id"])
            claim = await self._claim_once(me, seconds, nets)
            if claim is not None or trio.current_time() >= deadline:
                break
            with trio.move_on_at(deadline):
                await wake.wait()
        if claim is not None:
            self.agents.events.emit(
                me["team_id"],
                "agent.task.claimed",
                "agent_task",
                claim.task.id,
                agent_ref(me["id"]),
                {"run_id": claim.run.id, "session_id": me["id"], "attempt": str(claim.run.attempt)},
            )
        return m.ClaimReply(claim=claim)

    async def _claim_once(self, me: dict[str, Any], seconds: float, nets: list[str]) -> m.Claim | None:
        token = new_secret(CLAIM_TOKEN_PREFIX)
        now = self.agents.clock()
        limit = self.agents.config.agents_max_active_leases
        row = await self.agents.group.fetchone(
            leasesql.CLAIM,
            {
                "ws": me["workspace_id"],
                "team": me["team_id"],
                "caps": list(me["capabilities"]),
                "any_net": ANY in nets,
                "nets": nets,
                "sid": me["id"],
                "hash": sha256_hex(token),
                "now": at(now),
                "until": at(now + seconds),
                "limit": limit,
                "seconds": seconds,
            },
        )
        assert row is not None
        if row["held"] >= limit:
            raise LeaseConflict(
                f"the session already holds {row['held']} leases (at most {limit})", code="lease_limit"
            )
        if row["id"] is None:
            return None
        chan = views.channel(leasesql.split(row, "chan__"))
        return m.Claim(
            coordination_channel=chan,
            lease=views.lease(row, chan),
            run=views.run(row, chan),
            task=views.task(leasesql.split(row, "task__")),
        )

    async def change_lease(self, msg: m.ChangeLease) -> m.LeaseReply:
        me = await self.identity.resolve(msg.identity)
        c = self.agents.config
        seconds = L.lease_seconds(
            msg.lease_seconds, default=c.agents_lease_default_s, maximum=c.agents_lease_max_s
        )
        if msg.action == "complete" and find_claim_token(msg.result):
            raise Unprocessable("a result must not carry a claim token", code="claim_token_forbidden")
        if (
            msg.action == "complete"
            and len(msgspec.json.encode(msg.result)) > c.agents_message_max_bytes * 16
        ):
            raise Unprocessable("the result is too large", code="result_too_large")
        if msg.error is not None and len(msg.error) > 10_000:
            raise BadRequest("error is too long")
        now = self.agents.clock()
        actor = agent_ref(me["id"])
        fast = await self._change_as_holder(me, msg, seconds, now)
        if fast is not None:
            lease, task_id = fast
        else:
            lease, task_id = await self._change_slowly(me, msg, seconds, now)
        if msg.action == "release":
            self.agents.work_wakeups.fire(me["workspace_id"])
        name = EVENT_FOR_ACTION.get(msg.action)
        if name:
            self.agents.events.emit(
                me["team_id"],
                name,
                "agent_task",
                task_id,
                actor,
                {"run_id": msg.run_id, "session_id": me["id"]},
            )
        return m.LeaseReply(lease=lease)

    async def _change_as_holder(
        self, me: dict[str, Any], msg: m.ChangeLease, seconds: float, now: float
    ) -> tuple[m.Lease, str] | None:
        """The common case in one statement: the caller holds a live lease on the run. None otherwise."""
        outcome = L.OUTCOMES[msg.action]
        row = await self.agents.group.fetchone(
            leasesql.CHANGES[outcome],
            {
                "id": msg.run_id,
                "team": me["team_id"],
                "ws": me["workspace_id"],
                "sid": me["id"],
                "now": at(now),
                "until": at(now + seconds),
                "result": Jsonb(msg.result),
                "error": msg.error or "",
                "task_status": "" if outcome == "claimed" else TASK_FOR_OUTCOME[outcome],
                "action": f"run.{msg.action}",
                "audit": Jsonb({"outcome": outcome, **({"reason": msg.reason[:500]} if msg.reason else {})}),
            },
        )
        if row is None:
            return None
        return views.lease(row, views.channel(leasesql.split(row, "chan__"))), row["task_id"]

    async def _change_slowly(
        self, me: dict[str, Any], msg: m.ChangeLease, seconds: float, now: float
    ) -> tuple[m.Lease, str]:
        """Decide on the locked row (:func:`.lease.decide`): the precise refusal, or a late change."""
        actor = agent_ref(me["id"])

        def work(conn: Connection) -> tuple[m.Lease, str]:
            row = conn.execute(
                "SELECT * FROM runs WHERE id = %s AND team_id = %s AND workspace_id = %s FOR UPDATE",
                (msg.run_id, me["team_id"], me["workspace_id"]),
            ).fetchone()
            if row is None:
                raise NotFound("no such run", code="run_not_found")
            outcome = L.decide(
                L.LeaseView(
                    status=row["status"],
                    session_id=row["session_id"],
                    lease_until=epoch(row["lease_until"]),
                    failure_kind=row["failure_kind"],
                ),
                me["id"],
                msg.action,
                now,
            )
            params = {"id": row["id"], "hash": row["claim_token_hash"], "now": at(now)}
            if outcome == "claimed":
                sql = (
                    "UPDATE runs SET heartbeat_at = %(now)s, lease_until = %(until)s "
                    "WHERE id = %(id)s AND claim_token_hash = %(hash)s RETURNING *"
                )
                params["until"] = at(now + seconds)
            elif outcome == "completed":
                sql = (
                    "UPDATE runs SET status = 'completed', ended_at = %(now)s, result = %(result)s "
                    "WHERE id = %(id)s AND claim_token_hash = %(hash)s RETURNING *"
                )
                params["result"] = Jsonb(msg.result)
            elif outcome == "failed":
                sql = (
                    "UPDATE runs SET status = 'failed', ended_at = %(now)s, error = %(error)s, "
                    "  failure_kind = 'agent_reported' WHERE id = %(id)s AND claim_token_hash = %(hash)s "
                    "RETURNING *"
                )
                params["error"] = msg.error or ""
            else:
                sql = (
                    "UPDATE runs SET status = 'queued', session_id = NULL, claim_token_hash = NULL, "
                    "  lease_until = NULL, claimed_at = NULL, heartbeat_at = NULL "
                    "WHERE id = %(id)s AND claim_token_hash = %(hash)s RETURNING *"
                )
            updated = conn.execute(sql, params).fetchone()
            if updated is None:  # the fence: another lease took the row (cannot happen under FOR UPDATE)
                raise LeaseConflict("not an active lease", code=L.LEASE_NOT_ACTIVE)
            if outcome != "claimed":
                conn.execute(
                    "UPDATE tasks SET status = %s, updated_at = now() WHERE id = %s",
                    (TASK_FOR_OUTCOME[outcome], row["task_id"]),
                )
            audit(
                conn,
                me["team_id"],
                actor,
                f"run.{msg.action}",
                "run",
                row["id"],
                {"outcome": outcome, **({"reason": msg.reason[:500]} if msg.reason else {})},
            )
            chan = _channel_of(conn, row["coordination_channel_id"])
            return views.lease(updated, chan), row["task_id"]

        return await self.agents.db.transaction(work)

    # -- sweeper -------------------------------------------------------------------

    async def sweep_leases(self) -> L.SweepPlan:
        """Requeue or fail the runs whose lease ended."""
        now = self.agents.clock()

        def work(conn: Connection) -> tuple[L.SweepPlan, list[dict[str, Any]]]:
            rows = conn.execute(
                "SELECT id, team_id, workspace_id, task_id, status, lease_until, attempt, "
                "max_attempts FROM runs "
                "WHERE status = 'claimed' AND lease_until <= %s ORDER BY lease_until LIMIT 500 "
                "FOR UPDATE SKIP LOCKED",
                (at(now),),
            ).fetchall()
            plan = L.plan_sweep(
                [
                    L.SweepRow(
                        id=r["id"],
                        status=r["status"],
                        lease_until=epoch(r["lease_until"]),
                        attempt=r["attempt"],
                        max_attempts=r["max_attempts"],
                    )
                    for r in rows
                ],
                now,
            )
            if plan.requeue:
                conn.execute(
                    "UPDATE runs SET status = 'queued', attempt = attempt + 1, claim_token_hash = NULL, "
                    "heartbeat_at = NULL WHERE id = ANY(%s)",
                    (plan.requeue,),
                )
            if plan.fail:
                conn.execute(
                    "UPDATE runs SET status = 'failed', failure_kind = %s, error = 'lease expired', "
                    "ended_at = %s, claim_token_hash = NULL WHERE id = ANY(%s)",
                    (L.LEASE_EXPIRED, at(now), plan.fail),
                )
            by_id = {r["id"]: r for r in rows}
            for ids, status, action in (
                (plan.requeue, "ready", "run.requeue"),
                (plan.fail, "failed", "run.fail"),
            ):
                for run_id in ids:
                    r = by_id[run_id]
                    conn.execute(
                        "UPDATE tasks SET status = %s, updated_at = now() WHERE id = %s",
                        (status, r["task_id"]),
                    )
                    audit(conn, r["team_id"], SYSTEM, action, "run", run_id, {"reason": L.LEASE_EXPIRED})
            return plan, rows

        plan, rows = await self.agents.db.transaction(work)
        by_id = {r["id"]: r for r in rows}
        for run_id in plan.requeue:
            r = by_id[run_id]
            self.agents.work_wakeups.fire(r["workspace_id"])
            self.agents.events.emit(
                r["team_id"],
                "agent.task.requeued",
                "agent_task",
                r["task_id"],
                SYSTEM,
                {"run_id": run_id, "reason": L.LEASE_EXPIRED, "attempt": str(r["attempt"] + 1)},
            )
        for run_id in plan.fail:
            r = by_id[run_id]
            self.agents.events.emit(
                r["team_id"],
                "agent.task.failed",
                "agent_task",
                r["task_id"],
                SYSTEM,
                {"run_id": run_id, "reason": L.LEASE_EXPIRED},
            )
        return plan

    async def serve_sweeper(self, every_s: float) -> None:
        while True:
            try:
                await self.sweep_leases()
            except Exception:
                log.warning("could not sweep expired leases", exc_info=True)
            await trio.sleep(every_s)
