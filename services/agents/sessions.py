"""Agent sessions (``sessions``): operator create/list/get/stop, agent spawn, TTL sweep.

Creating or spawning a session locks its workspace row, so the active-session
budget holds under concurrent creates; a spawn also locks its parent, so
``max_children`` holds too. Stopping follows :func:`.lineage.stop_order`:
every auto-stopping descendant first (deepest first), each once, with its
claimed leases requeued; each stop is audited and published
(``agent.session.stopped``).
"""

from __future__ import annotations

from typing import Any

import trio
from psycopg.types.json import Jsonb

from dovecote.bus.messages import agents as m
from dovecote.bus.messages.agents import Ref
from dovecote.libs.db import Connection
from dovecote.libs.errors import UniqueViolation
from dovecote.libs.logs import get_logger
from dovecote.services.agents import lineage, views
from dovecote.services.agents.capsules import SessionCapsules, team_principal
from dovecote.services.agents.core import (
    AGENT_TOKEN_PREFIX,
    Agents,
    agent_ref,
    at,
    audit,
    epoch,
    new_id,
    new_secret,
    operator_ref,
    sha256_hex,
)
from dovecote.services.agents.errors import BadRequest, Conflict, NotFound
from dovecote.services.agents.identity import Identity
from dovecote.services.agents.workspaces import check_name, coordinator_budget, coordinator_in

log = get_logger("dovecote.agents.sessions")
ACTIVE = ("starting", "active")
SYSTEM = Ref(kind="system", ref="agents")


def _policy_in(value: dict[str, list[str] | None] | None) -> dict[str, list[str] | None] | None:
    if value is None:
        return None
    unknown = set(value) - set(lineage.POLICY_FIELDS)
    if unknown:
        raise BadRequest(f"unknown permission fields: {sorted(unknown)}", code="invalid_request")
    for name, items in value.items():
        if items is not None and (len(items) > 256 or any(not i or len(i) > 256 for i in items)):
            raise BadRequest(f"permissions.{name}: at most 256 names of 1..256 characters")
    return value


def _check_caps(caps: list[str]) -> list[str]:
    if len(caps) > 64 or any(not c or len(c) > 100 for c in caps):
        raise BadRequest("capabilities: at most 64 names of 1..100 characters")
    return sorted(set(caps))


class Sessions:
    def __init__(self, agents: Agents, identity: Identity, capsules: SessionCapsules | None = None) -> None:
        self.agents = agents
        self.identity = identity
        self.capsules = capsules

    def register(self, handle: Any) -> None:
        handle(m.CreateSession, self.create)
        handle(m.ListSessions, self.list_sessions)
        handle(m.GetSession, self.get)
        handle(m.StopSession, self.stop)
        handle(m.SpawnSession, self.spawn)

    # -- operator -----------------------------------------------------------------

    async def create(self, msg: m.CreateSession) -> m.SessionCreated:
        check_name(msg.agent_name, "agent_name")
        for value, what in (
            (msg.name, "name"),
            (msg.channel, "channel"),
            (msg.provider, "provider"),
            (msg.model, "model"),
        ):
            if len(value) > 200:
                raise BadRequest(f"{what} is too long")
        if msg.ttl_seconds is not None and msg.ttl_seconds < 0:
            raise BadRequest("ttl_seconds must not be negative")
        requested = _policy_in(msg.permissions)
        caps = _check_caps(msg.capabilities)
        team, actor = msg.actor.team_id, operator_ref(msg.actor)
        token = new_secret(AGENT_TOKEN_PREFIX)
        now = self.agents.clock()
        sid = new_id("as_")
        capsule: tuple[str, str] | None = None
        if msg.capsule_template is not None:
            if self.capsules is None:
                raise BadRequest("capsule-bound sessions are not available here", code="invalid_request")
            capsule = await self.capsules.create(msg.actor, msg.capsule_template, sid)

        def work(conn: Connection) -> dict[str, Any]:
            ws = conn.execute(
                "SELECT id FROM workspaces WHERE id = %s AND team_id = %s FOR UPDATE",
                (msg.workspace_id, team),
            ).fetchone()
            if ws is None:
                raise NotFound("no such workspace", code="workspace_not_found")
            coord = coordinator_in(conn, self.agents, team, msg.workspace_id)
            budget = coordinator_budget(coord)
            active = conn.execute(
                "SELECT count(*) AS n FROM sessions WHERE workspace_id = %s AND state IN "
                "('starting', 'active')",
                (msg.workspace_id,),
            ).fetchone()
            assert active is not None
            if active["n"] >= budget.max_active_per_workspace:
                raise Conflict(
                    f"the workspace already has {active['n']} active sessions",
                    code="max_active_per_workspace",
                )
            policy = lineage.narrow(lineage.full_policy(), requested)
            expires = lineage.ttl_expiry(msg.ttl_seconds, coord.default_ttl_seconds, now, None)
            row = conn.execute(
                "INSERT INTO sessions (id, team_id, workspace_id, agent_name, name, channel, "
                "provider, model, "
                "  type, state, token_hash, capabilities, root_session_id, permission_policy, spawn_budget, "
                "  ttl_seconds, ttl_expires_at, created_by, capsule_id, capsule_host) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'user', 'active', %s, %s, %s, %s, %s, %s, %s, %s, "
                "  %s, %s) "
                "RETURNING *",
                (
                    sid,
                    team,
                    msg.workspace_id,
                    msg.agent_name,
                    msg.name,
                    msg.channel,
                    msg.provider,
                    msg.model,
                    bytes.fromhex(sha256_hex(token)),
                    caps,
                    sid,
                    Jsonb(policy),
                    Jsonb(
                        {
                            "max_children": budget.max_children,
                            "max_depth": budget.max_depth,
                            "max_active_per_workspace": budget.max_active_per_workspace,
                            "ttl_seconds": msg.ttl_seconds or 0,
                        }
                    ),
                    msg.ttl_seconds,
                    at(expires) if expires else None,
                    actor.ref,
                    capsule[0] if capsule else None,
                    capsule[1] if capsule else None,
                ),
            ).fetchone()
            assert row is not None
            audit(
                conn,
                team,
                actor,
                "session.create",
                "agent_session",
                sid,
                {
                    "workspace_id": msg.workspace_id,
                    "agent_name": msg.agent_name,
                    **({"capsule_id": capsule[0]} if capsule else {}),
                },
            )
            return row

        try:
            row = await self.agents.db.transaction(work)
        except BaseException:
            if capsule is not None and self.capsules is not None:
                with trio.CancelScope(shield=True):
                    await self.capsules.destroy(team, *capsule)
            raise
        if capsule is not None and self.capsules is not None:
            try:
                await self.capsules.bind(msg.actor, capsule[0], capsule[1], sid, msg.agent_name)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.stop_tree(team, sid, "operator_stop", actor, "its capsule could not be bound")
                raise
        self.agents.events.emit(
            team,
            "agent.session.created",
            "agent_session",
            row["id"],
            actor,
            {"workspace_id": row["workspace_id"], "agent_name": row["agent_name"]},
        )
        return m.SessionCreated(session=views.session(row), token=token)

    async def list_sessions(self, msg: m.ListSessions) -> m.SessionsReply:
        rows = await self.agents.db.fetchall(
            "SELECT * FROM sessions WHERE team_id = %s AND (%s = '' OR workspace_id = %s) "
            "AND (%s = '' OR state = %s) ORDER BY created_at, id LIMIT 1000",
            (msg.actor.team_id, msg.workspace_id, msg.workspace_id, msg.state, msg.state),
        )
        return m.SessionsReply(sessions=[views.session(r) for r in rows])

    async def get(self, msg: m.GetSession) -> m.SessionReply:
        row = await self.agents.db.fetchone(
            "SELECT * FROM sessions WHERE id = %s AND team_id = %s", (msg.session_id, msg.actor.team_id)
        )
        if row is None:
            raise NotFound("no such agent session", code="session_not_found")
        children = await self.agents.db.fetchall(
            "SELECT * FROM sessions WHERE parent_session_id = %s AND team_id = %s ORDER BY created_at, id",
            (msg.session_id, msg.actor.team_id),
        )
        return m.SessionReply(session=views.session(row), children=[views.session(c) for c in children])

    async def stop(self, msg: m.StopSession) -> m.SessionReply:
        found = await self.agents.db.fetchone(
            "SELECT id FROM sessions WHERE id = %s AND team_id = %s", (msg.session_id, msg.actor.team_id)
        )
        if found is None:
            raise NotFound("no such agent session", code="session_not_found")
        await self.stop_tree(
            msg.actor.team_id, msg.session_id, "operator_stop", operator_ref(msg.actor), msg.detail[:500]
        )
        return await self.get(m.GetSession(actor=msg.actor, session_id=msg.session_id))

    async def stop_tree(
        self, team_id: str, session_id: str, reason: str, actor: Ref, detail: str = ""
    ) -> list[str]:
        """Stop a session and its auto-stopping descendants, children first; the ids stopped, in order."""

        def work(conn: Connection) -> tuple[list[str], list[str]]:
            root = conn.execute(
                "SELECT root_session_id FROM sessions WHERE id = %s AND team_id = %s", (session_id, team_id)
            ).fetchone()
            if root is None:
                return [], []
            rows = conn.execute(
                "SELECT id, parent_session_id, auto_stop_on_parent, state FROM sessions "
                "WHERE root_session_id = %s AND team_id = %s ORDER BY id FOR UPDATE",
                (root["root_session_id"], team_id),
            ).fetchall()
            nodes = [
                lineage.Node(
                    id=r["id"],
                    parent_id=r["parent_session_id"],
                    auto_stop_on_parent=r["auto_stop_on_parent"],
                    stopped=r["state"] == "stopped",
                )
                for r in rows
            ]
            order = lineage.stop_order(session_id, nodes)
            requeued: list[str] = []
            for sid in order:
                why = reason if sid == session_id else "parent_stopped"
                conn.execute(
                    "UPDATE sessions SET state = 'stopped', stop_reason = %s, stop_detail = %s, "
                    "updated_at = now() WHERE id = %s",
                    (why, detail if sid == session_id else "", sid),
                )
                runs = conn.execute(
                    "UPDATE runs SET status = 'queued', session_id = NULL, claim_token_hash = NULL, "
                    "  lease_until = NULL, claimed_at = NULL, heartbeat_at = NULL "
                    "WHERE session_id = %s AND status = 'claimed' RETURNING id, task_id, workspace_id",
                    (sid,),
                ).fetchall()
                for r in runs:
                    conn.execute(
                        "UPDATE tasks SET status = 'ready', updated_at = now() WHERE id = %s", (r["task_id"],)
                    )
                    audit(conn, team_id, SYSTEM, "run.requeue", "run", r["id"], {"reason": "session_stopped"})
                    requeued.append(r["workspace_id"])
                audit(conn, team_id, actor, "session.stop", "agent_session", sid, {"reason": why})
            return order, requeued

        order, requeued = await self.agents.db.transaction(work)
        self.identity.forget(*order)
        if self.capsules is not None and order:
            bound = await self.agents.db.fetchall(
                "SELECT capsule_id, capsule_host FROM sessions WHERE id = ANY(%s) AND capsule_id IS NOT NULL",
                (order,),
            )
            for r in bound:  # the capsule ends with its session
                await self.capsules.destroy(team_id, r["capsule_id"], r["capsule_host"])
        for ws in set(requeued):
            self.agents.work_wakeups.fire(ws)
        for sid in order:
            self.agents.events.emit(
                team_id,
                "agent.session.stopped",
                "agent_session",
                sid,
                actor,
                {"reason": reason if sid == session_id else "parent_stopped"},
            )
        return order

    # -- agent ---------------------------------------------------------------------

    async def spawn(self, msg: m.SpawnSession) -> m.SpawnReply:
        parent = await self.identity.resolve(msg.identity)
        check_name(msg.agent_name, "agent_name")
        if len(msg.spawn_role) > 100 or len(msg.name) > 200:
            raise BadRequest("spawn_role or name is too long")
        if msg.ttl_seconds is not None and msg.ttl_seconds < 0:
            raise BadRequest("ttl_seconds must not be negative")
        if msg.idempotency_key is not None and not 0 < len(msg.idempotency_key) <= 200:
            raise BadRequest("idempotency_key must be 1..200 characters")
        requested = _policy_in(msg.permissions)
        caps = _check_caps(msg.capabilities if msg.capabilities is not None else list(parent["capabilities"]))
        team, actor = parent["team_id"], agent_ref(parent["id"])
        token = new_secret(AGENT_TOKEN_PREFIX)
        now = self.agents.clock()

        def work(conn: Connection) -> tuple[dict[str, Any], bool]:
            if msg.idempotency_key is not None:
                same = conn.execute(
                    "SELECT * FROM sessions WHERE parent_session_id = %s AND idempotency_key = %s",
                    (parent["id"], msg.idempotency_key),
                ).fetchone()
                if same is not None:
                    return same, False
            conn.execute("SELECT 1 FROM workspaces WHERE id = %s FOR UPDATE", (parent["workspace_id"],))
            me = conn.execute("SELECT * FROM sessions WHERE id = %s FOR UPDATE", (parent["id"],)).fetchone()
            assert me is not None
            coord = coordinator_in(conn, self.agents, team, parent["workspace_id"])
            own = views.budget(me["spawn_budget"])
            budget = lineage.effective_budget(
                lineage.Budget(
                    max_children=own.max_children,
                    max_depth=own.max_depth,
                    max_active_per_workspace=own.max_active_per_workspace,
                    ttl_seconds=own.ttl_seconds,
                ),
                coordinator_budget(coord),
            )
            counts = conn.execute(
                "SELECT count(*) FILTER (WHERE parent_session_id = %(p)s) AS children, count(*) AS active "
                "FROM sessions WHERE workspace_id = %(ws)s AND state IN ('starting', 'active')",
                {"p": parent["id"], "ws": parent["workspace_id"]},
            ).fetchone()
            assert counts is not None
            lineage.check_spawn(
                budget,
                lineage.SpawnCounts(
                    parent_depth=me["spawn_depth"],
                    active_children=counts["children"],
                    active_in_workspace=counts["active"],
                ),
            )
            policy = lineage.narrow(me["permission_policy"], requested)
            expires = lineage.ttl_expiry(
                msg.ttl_seconds, coord.default_ttl_seconds, now, epoch(me["ttl_expires_at"])
            )
            sid = new_id("as_")
            child_budget = {
                "max_children": budget.max_children,
                "max_depth": budget.max_depth,
                "max_active_per_workspace": budget.max_active_per_workspace,
                "ttl_seconds": msg.ttl_seconds or 0,
            }
            row = conn.execute(
                "INSERT INTO sessions (id, team_id, workspace_id, agent_name, name, channel, "
                "provider, model, "
                "  type, state, token_hash, capabilities, root_session_id, parent_session_id, spawn_depth, "
                "  spawn_role, permission_policy, spawn_budget, auto_stop_on_parent, ttl_seconds, "
                "  ttl_expires_at, idempotency_key, created_by) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'spawned', 'active', %s, %s, %s, %s, %s, "
                "%s, %s, %s, "
                "  %s, %s, %s, %s, %s) RETURNING *",
                (
                    sid,
                    team,
                    me["workspace_id"],
                    msg.agent_name,
                    msg.name,
                    me["channel"],
                    me["provider"],
                    me["model"],
                    bytes.fromhex(sha256_hex(token)),
                    caps,
                    me["root_session_id"],
                    me["id"],
                    me["spawn_depth"] + 1,
                    msg.spawn_role,
                    Jsonb(policy),
                    Jsonb(child_budget),
                    msg.auto_stop_on_parent,
                    msg.ttl_seconds,
                    at(expires) if expires else None,
                    msg.idempotency_key,
                    me["id"],
                ),
            ).fetchone()
            assert row is not None
            audit(
                conn,
                team,
                actor,
                "session.spawn",
                "agent_session",
                sid,
                {"parent_session_id": me["id"], "agent_name": msg.agent_name, "spawn_role": msg.spawn_role},
            )
            return row, True

        try:
            row, created = await self.agents.db.transaction(work)
        except UniqueViolation:  # the same idempotency key, concurrently: the other spawn won
            again = await self.agents.db.fetchone(
                "SELECT * FROM sessions WHERE parent_session_id = %s AND idempotency_key = %s",
                (parent["id"], msg.idempotency_key),
            )
            if again is None:
                raise
            row = again
            created = False
        if created and self.capsules is not None:
            row = await self._spawn_capsule(row)
        if created:
            self.agents.events.emit(
                team,
                "agent.session.spawned",
                "agent_session",
                row["id"],
                actor,
                {
                    "parent_session_id": parent["id"],
                    "workspace_id": row["workspace_id"],
                    "agent_name": row["agent_name"],
                },
            )
        view = views.session(row)
        return m.SpawnReply(
            spawn=m.Spawn(
                lineage=view.lineage,
                permissions=view.lineage.permission_policy,
                session=view,
                token=token if created else None,
            )
        )

    async def _spawn_capsule(self, row: dict[str, Any]) -> dict[str, Any]:
        """Bind a spawned child to a capsule when a ``sandbox_profiles`` entry names a template."""
        assert self.capsules is not None
        profiles = [p for p in row["permission_policy"].get("sandbox_profiles") or [] if p != lineage.ANY]
        template = await self.capsules.template_named(row["team_id"], profiles) if profiles else None
        if template is None:
            return row
        principal = team_principal(row["team_id"])
        try:
            capsule_id, host = await self.capsules.create(principal, template, row["id"])
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.stop_tree(row["team_id"], row["id"], "operator_stop", SYSTEM, "no capsule")
            raise
        try:
            bound = await self.agents.db.fetchone(
                "UPDATE sessions SET capsule_id = %s, capsule_host = %s, updated_at = now() "
                "WHERE id = %s RETURNING *",
                (capsule_id, host, row["id"]),
            )
            assert bound is not None
            await self.capsules.bind(principal, capsule_id, host, row["id"], row["agent_name"])
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.stop_tree(row["team_id"], row["id"], "operator_stop", SYSTEM, "no capsule")
                await self.capsules.destroy(row["team_id"], capsule_id, host)
            raise
        return bound

    # -- TTL -----------------------------------------------------------------------

    async def sweep_ttl(self) -> int:
        """Stop the sessions whose TTL passed (with their auto-stopping descendants)."""
        rows = await self.agents.db.fetchall(
            "SELECT id, team_id FROM sessions WHERE state <> 'stopped' AND ttl_expires_at <= %s "
            "ORDER BY spawn_depth, ttl_expires_at LIMIT 200",
            (at(self.agents.clock()),),
        )
        stopped = 0
        for row in rows:
            stopped += len(await self.stop_tree(row["team_id"], row["id"], "ttl_expired", SYSTEM))
        return stopped

    async def serve_ttl(self, every_s: float) -> None:
        while True:
            try:
                await self.sweep_ttl()
            except Exception:
                log.warning("could not sweep session TTLs", exc_info=True)
            await trio.sleep(every_s)
