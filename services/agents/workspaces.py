"""Workspaces and their coordinator settings (``workspaces``, ``coordinators``)."""

from __future__ import annotations

from typing import Any

from dovecote.bus.messages import agents as m
from dovecote.libs.db import Connection
from dovecote.libs.errors import UniqueViolation
from dovecote.services.agents import views
from dovecote.services.agents.core import Agents, audit, new_id, operator_ref
from dovecote.services.agents.errors import BadRequest, Conflict, Forbidden, NotFound
from dovecote.services.agents.identity import Identity
from dovecote.services.agents.lineage import Budget


def check_name(value: str, what: str, max_len: int = 100) -> str:
    if not value or len(value) > max_len or not value.isprintable():
        raise BadRequest(f"{what} must be 1..{max_len} printable characters", code="invalid_request")
    return value


class Workspaces:
    def __init__(self, agents: Agents, identity: Identity) -> None:
        self.agents = agents
        self.identity = identity

    def register(self, handle: Any) -> None:
        handle(m.CreateWorkspace, self.create)
        handle(m.ListWorkspaces, self.list_workspaces)
        handle(m.PutCoordinator, self.put_coordinator)
        handle(m.GetCoordinatorConfig, self.coordinator_config)

    async def create(self, msg: m.CreateWorkspace) -> m.WorkspaceReply:
        check_name(msg.name, "name")
        if len(msg.root_dir) > 1024:
            raise BadRequest("root_dir is too long")
        team = msg.actor.team_id

        def work(conn: Connection) -> dict[str, Any]:
            row = conn.execute(
                "INSERT INTO workspaces (id, team_id, name, root_dir, created_by) VALUES (%s, %s, "
                "%s, %s, %s) "
                "RETURNING *",
                (new_id("ws_"), team, msg.name, msg.root_dir, operator_ref(msg.actor).ref),
            ).fetchone()
            assert row is not None
            audit(
                conn,
                team,
                operator_ref(msg.actor),
                "workspace.create",
                "workspace",
                row["id"],
                {"name": msg.name},
            )
            return row

        try:
            row = await self.agents.db.transaction(work)
        except UniqueViolation:
            raise Conflict(f"a workspace named {msg.name!r} exists", code="workspace_name_taken") from None
        return m.WorkspaceReply(workspace=views.workspace(row))

    async def list_workspaces(self, msg: m.ListWorkspaces) -> m.WorkspacesReply:
        rows = await self.agents.db.fetchall(
            "SELECT * FROM workspaces WHERE team_id = %s ORDER BY created_at, id", (msg.actor.team_id,)
        )
        return m.WorkspacesReply(workspaces=[views.workspace(r) for r in rows])

    async def put_coordinator(self, msg: m.PutCoordinator) -> m.CoordinatorReply:
        c = self.agents.config
        team = msg.actor.team_id
        values = {
            "ws": msg.workspace_id,
            "team": team,
            "enabled": msg.enabled,
            "agent": msg.agent_name,
            "provider": msg.provider,
            "model": msg.model,
            "children": c.agents_max_children if msg.max_children is None else msg.max_children,
            "depth": c.agents_max_depth if msg.max_depth is None else msg.max_depth,
            "active": (
                c.agents_max_active_per_workspace
                if msg.max_active_sessions_per_workspace is None
                else msg.max_active_sessions_per_workspace
            ),
            "ttl": c.agents_default_ttl_s if msg.default_ttl_seconds is None else msg.default_ttl_seconds,
        }
        if any(int(str(values[k])) < 0 for k in ("children", "depth", "active", "ttl")):
            raise BadRequest("limits must not be negative")

        def work(conn: Connection) -> None:
            found = conn.execute(
                "SELECT 1 FROM workspaces WHERE id = %s AND team_id = %s FOR UPDATE", (msg.workspace_id, team)
            ).fetchone()
            if found is None:
                raise NotFound("no such workspace", code="workspace_not_found")
            conn.execute(
                "INSERT INTO coordinators (workspace_id, team_id, enabled, agent_name, provider, model, "
                "  max_children, max_depth, max_active_sessions, default_ttl_seconds) "
                "VALUES (%(ws)s, %(team)s, %(enabled)s, %(agent)s, %(provider)s, %(model)s, %(children)s, "
                "  %(depth)s, %(active)s, %(ttl)s) "
                "ON CONFLICT (workspace_id) DO UPDATE SET enabled = excluded.enabled, "
                "  agent_name = excluded.agent_name, provider = excluded.provider, model = excluded.model, "
                "  max_children = excluded.max_children, max_depth = excluded.max_depth, "
                "  max_active_sessions = excluded.max_active_sessions, "
                "  default_ttl_seconds = excluded.default_ttl_seconds, updated_at = now()",
                values,
            )
            audit(
                conn,
                team,
                operator_ref(msg.actor),
                "coordinator.update",
                "workspace",
                msg.workspace_id,
                {k: v for k, v in values.items() if k not in ("ws", "team")},
            )

        await self.agents.db.transaction(work)
        return m.CoordinatorReply(coordinator=await self.coordinator(team, msg.workspace_id))

    async def coordinator(self, team_id: str, workspace_id: str) -> m.Coordinator:
        row = await self.agents.db.fetchone(
            "SELECT * FROM coordinators WHERE workspace_id = %s AND team_id = %s", (workspace_id, team_id)
        )
        return coordinator_view(self.agents, workspace_id, row)

    async def coordinator_config(self, msg: m.GetCoordinatorConfig) -> m.CoordinatorReply:
        me = await self.identity.resolve(msg.identity)
        if msg.workspace and msg.workspace != me["workspace_id"]:
            name = await self.agents.db.fetchval(
                "SELECT name FROM workspaces WHERE id = %s AND team_id = %s",
                (me["workspace_id"], me["team_id"]),
            )
            if msg.workspace != name:
                raise Forbidden(
                    "an agent session reads its own workspace's coordinator only", code="workspace_forbidden"
                )
        return m.CoordinatorReply(coordinator=await self.coordinator(me["team_id"], me["workspace_id"]))


def coordinator_view(agents: Agents, workspace_id: str, row: dict[str, Any] | None) -> m.Coordinator:
    c = agents.config
    if row is None:
        return m.Coordinator(
            agent_name="",
            default_ttl_seconds=c.agents_default_ttl_s,
            enabled=True,
            max_active_sessions_per_workspace=c.agents_max_active_per_workspace,
            max_children=c.agents_max_children,
            max_depth=c.agents_max_depth,
            model="",
            provider="",
            source="default",
            workspace_id=workspace_id,
        )
    return m.Coordinator(
        agent_name=row["agent_name"],
        default_ttl_seconds=row["default_ttl_seconds"],
        enabled=row["enabled"],
        max_active_sessions_per_workspace=row["max_active_sessions"],
        max_children=row["max_children"],
        max_depth=row["max_depth"],
        model=row["model"],
        provider=row["provider"],
        source="workspace",
        workspace_id=workspace_id,
    )


def coordinator_budget(coord: m.Coordinator) -> Budget:
    return Budget(
        max_children=coord.max_children,
        max_depth=coord.max_depth,
        max_active_per_workspace=coord.max_active_sessions_per_workspace,
        ttl_seconds=coord.default_ttl_seconds,
    )


def coordinator_in(conn: Connection, agents: Agents, team_id: str, workspace_id: str) -> m.Coordinator:
    """The coordinator settings, read inside a transaction."""
    row = conn.execute(
        "SELECT * FROM coordinators WHERE workspace_id = %s AND team_id = %s", (workspace_id, team_id)
    ).fetchone()
    return coordinator_view(agents, workspace_id, row)
