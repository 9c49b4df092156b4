"""``me`` and ``context``: what an agent session reads about itself (read-only)."""

from __future__ import annotations

from typing import Any

from dovecote.bus.messages import agents as m
from dovecote.services.agents import context as C
from dovecote.services.agents import views
from dovecote.services.agents.channels import Channels
from dovecote.services.agents.core import Agents, at, iso_now
from dovecote.services.agents.identity import Identity
from dovecote.services.agents.souls import Souls
from dovecote.services.agents.workspaces import Workspaces


class SelfViews:
    def __init__(
        self, agents: Agents, identity: Identity, workspaces: Workspaces, channels: Channels, souls: Souls
    ) -> None:
        self.agents = agents
        self.identity = identity
        self.workspaces = workspaces
        self.channels = channels
        self.souls = souls

    def register(self, handle: Any) -> None:
        handle(m.GetMe, self.me)
        handle(m.GetContext, self.context)

    def limits(self, coord: m.Coordinator) -> m.Limits:
        c = self.agents.config
        return m.Limits(
            context_section_limit=c.agents_context_section_limit,
            max_active_task_leases=c.agents_max_active_leases,
            max_children=coord.max_children,
            max_spawn_depth=coord.max_depth,
        )

    async def _workspace(self, me: dict[str, Any]) -> m.Workspace:
        row = await self.agents.db.fetchone(
            "SELECT * FROM workspaces WHERE id = %s AND team_id = %s", (me["workspace_id"], me["team_id"])
        )
        assert row is not None
        return views.workspace(row)

    async def _leases(self, me: dict[str, Any]) -> list[tuple[m.Lease, m.Run, m.Task]]:
        rows = await self.agents.db.fetchall(
            "SELECT r.*, to_jsonb(c.*) AS chan, to_jsonb(t.*) AS task_row FROM runs r "
            "JOIN channels c ON c.id = r.coordination_channel_id JOIN tasks t ON t.id = r.task_id "
            "WHERE r.session_id = %s AND r.team_id = %s AND r.status = 'claimed' AND r.lease_until > %s "
            "ORDER BY r.lease_until",
            (me["id"], me["team_id"], at(self.agents.clock())),
        )
        out = []
        for r in rows:
            chan = views.channel(_timestamps(r["chan"], "last_activity_at", "created_at"))
            task = views.task(_timestamps(r["task_row"], "created_at", "updated_at"))
            out.append((views.lease(r, chan), views.run(r, chan), task))
        return out

    async def me(self, msg: m.GetMe) -> m.MeReply:
        me = await self.identity.resolve(msg.identity)
        coord = await self.workspaces.coordinator(me["team_id"], me["workspace_id"])
        session = views.session(me)
        return m.MeReply(
            me=m.Me(
                active_task_leases=[lease for lease, _, _ in await self._leases(me)],
                capabilities=[
                    m.Capability(id=c, source="session", summary="") for c in sorted(me["capabilities"])
                ],
                channels=await self.channels.workspace_channels(
                    me, self.agents.config.agents_context_section_limit
                ),
                coordinator=coord,
                limits=self.limits(coord),
                self=m.SelfInfo(
                    agent_name=me["agent_name"],
                    model=me["model"],
                    provider=me["provider"],
                    session_id=me["id"],
                ),
                session=session,
                workspace=await self._workspace(me),
            )
        )

    async def context(self, msg: m.GetContext) -> m.ContextReply:
        me = await self.identity.resolve(msg.identity)
        limit = self.agents.config.agents_context_section_limit
        coord = await self.workspaces.coordinator(me["team_id"], me["workspace_id"])
        db = self.agents.db
        scope = {"me": me["id"], "ws": me["workspace_id"], "team": me["team_id"], "limit": limit + 1}
        unread_where = (
            "FROM messages m JOIN channels c ON c.id = m.channel_id "
            "LEFT JOIN cursors k ON k.channel_id = m.channel_id AND k.session_id = %(me)s "
            "WHERE c.workspace_id = %(ws)s AND c.team_id = %(team)s AND m.seq > coalesce(k.last_seq, 0) "
            "AND m.from_session_id <> %(me)s AND (m.to_session_id IS NULL OR m.to_session_id = %(me)s)"
        )
        unread = int(await db.fetchval("SELECT count(*) " + unread_where, scope))
        inbox = await db.fetchall(
            "SELECT m.* " + unread_where + " ORDER BY m.created_at DESC, m.seq DESC LIMIT %(limit)s", scope
        )
        peers = await db.fetchall(
            "SELECT * FROM sessions WHERE workspace_id = %(ws)s AND team_id = %(team)s AND state = 'active' "
            "AND id <> %(me)s ORDER BY created_at, id LIMIT %(limit)s",
            scope,
        )
        named = None
        if me["channel"]:
            row = await db.fetchone(
                "SELECT * FROM channels WHERE workspace_id = %s AND team_id = %s AND channel = %s",
                (me["workspace_id"], me["team_id"], me["channel"]),
            )
            named = views.channel(row) if row else None
        context = C.project(
            C.ContextInputs(
                session=views.session(me),
                workspace=await self._workspace(me),
                soul=await self.souls.current(me["team_id"], me["agent_name"]),
                leases=await self._leases(me),
                named_channel=named,
                inbox=[views.message(r) for r in inbox],
                unread_count=unread,
                peers=[views.session(p) for p in peers],
                limits=self.limits(coord),
                soul_projection_bytes=self.agents.config.agents_soul_projection_bytes,
                generated_at=iso_now(self.agents.clock),
            )
        )
        return m.ContextReply(context=context)


def _timestamps(row: dict[str, Any], *names: str) -> dict[str, Any]:
    """A row read back from ``to_jsonb``: its timestamps are strings again."""
    from datetime import datetime

    out = dict(row)
    for name in names:
        if isinstance(out.get(name), str):
            out[name] = datetime.fromisoformat(out[name])
    return out
