"""Soul documents per team and agent name (``souls``): every operator PUT is a revision."""

from __future__ import annotations

from typing import Any

import msgspec
from psycopg.types.json import Jsonb

from dovecote.bus.messages import agents as m
from dovecote.libs.db import Connection
from dovecote.libs.timefmt import rfc3339
from dovecote.services.agents import soul as S
from dovecote.services.agents.core import Agents, audit, new_id, operator_ref
from dovecote.services.agents.identity import Identity
from dovecote.services.agents.workspaces import check_name

SOURCE = "dovecote:souls"


class Souls:
    def __init__(self, agents: Agents, identity: Identity) -> None:
        self.agents = agents
        self.identity = identity

    def register(self, handle: Any) -> None:
        handle(m.PutSoul, self.put)
        handle(m.GetSoul, self.get)
        handle(m.ValidateSoul, self.validate)

    def _limits(self) -> m.SoulLimits:
        c = self.agents.config
        return m.SoulLimits(
            context_projection_bytes=c.agents_soul_projection_bytes,
            max_body_bytes=c.agents_soul_max_body_bytes,
            max_bytes=c.agents_soul_max_bytes,
        )

    def _parse(self, text: str) -> S.ParsedSoul:
        c = self.agents.config
        return S.parse(text, max_bytes=c.agents_soul_max_bytes, max_body_bytes=c.agents_soul_max_body_bytes)

    def document(
        self,
        agent_name: str,
        parsed: S.ParsedSoul | None,
        *,
        revision_id: str | None = None,
        created_at: str | None = None,
    ) -> m.Soul:
        limits = self._limits()
        provenance = m.SoulProvenance(
            context_projection_bytes=limits.context_projection_bytes,
            digest=S.digest_of(f"{limits.max_bytes}:{limits.max_body_bytes}"),
            enabled=True,
            max_body_bytes=limits.max_body_bytes,
            source=SOURCE,
        )
        if parsed is None:
            return m.Soul(
                active=False,
                agent_name=agent_name,
                body="",
                config_provenance=provenance,
                created_at=None,
                diagnostics=[],
                digest="",
                enabled=True,
                frontmatter=m.SoulFrontmatter(),
                limits=limits,
                present=False,
                revision_id=None,
                snapshot_id=None,
                source_path="",
                truncated=False,
                valid=False,
                validation_status="missing",
            )
        body = parsed.body
        if parsed.truncated:
            body = body.encode()[: limits.max_body_bytes].decode(errors="ignore")
        return m.Soul(
            active=parsed.valid,
            agent_name=agent_name,
            body=body,
            config_provenance=provenance,
            created_at=created_at,
            diagnostics=parsed.diagnostics,
            digest=parsed.digest,
            enabled=True,
            frontmatter=parsed.frontmatter,
            limits=limits,
            present=True,
            revision_id=revision_id,
            snapshot_id=revision_id,
            source_path=f"souls/{agent_name}.md" if revision_id else "",
            truncated=parsed.truncated,
            valid=parsed.valid,
            validation_status="valid" if parsed.valid else "invalid",
        )

    async def put(self, msg: m.PutSoul) -> m.SoulReply:
        check_name(msg.agent_name, "agent_name")
        parsed = self._parse(msg.content)
        team, actor = msg.actor.team_id, operator_ref(msg.actor)
        if len(msg.content.encode()) > self.agents.config.agents_soul_max_bytes:
            return m.SoulReply(soul=self.document(msg.agent_name, parsed))  # not stored

        def work(conn: Connection) -> dict[str, Any]:
            row = conn.execute(
                "INSERT INTO souls (revision_id, team_id, agent_name, body, frontmatter, "
                "diagnostics, valid, digest) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING revision_id, created_at",
                (
                    new_id("soul_"),
                    team,
                    msg.agent_name,
                    msg.content,
                    Jsonb(msgspec.to_builtins(parsed.frontmatter)),
                    Jsonb(msgspec.to_builtins(parsed.diagnostics)),
                    parsed.valid,
                    parsed.digest,
                ),
            ).fetchone()
            assert row is not None
            audit(
                conn,
                team,
                actor,
                "soul.update",
                "soul",
                msg.agent_name,
                {"revision_id": row["revision_id"], "valid": parsed.valid, "digest": parsed.digest},
            )
            return row

        row = await self.agents.db.transaction(work)
        return m.SoulReply(
            soul=self.document(
                msg.agent_name, parsed, revision_id=row["revision_id"], created_at=rfc3339(row["created_at"])
            )
        )

    async def current(self, team_id: str, agent_name: str) -> m.Soul:
        row = await self.agents.db.fetchone(
            "SELECT revision_id, body, created_at FROM souls WHERE team_id = %s AND agent_name = %s "
            "ORDER BY created_at DESC, revision_id DESC LIMIT 1",
            (team_id, agent_name),
        )
        if row is None:
            return self.document(agent_name, None)
        return self.document(
            agent_name,
            self._parse(row["body"]),
            revision_id=row["revision_id"],
            created_at=rfc3339(row["created_at"]),
        )

    async def get(self, msg: m.GetSoul) -> m.SoulReply:
        me = await self.identity.resolve(msg.identity)
        return m.SoulReply(soul=await self.current(me["team_id"], me["agent_name"]))

    async def validate(self, msg: m.ValidateSoul) -> m.SoulReply:
        me = await self.identity.resolve(msg.identity)
        if msg.content is None:
            return m.SoulReply(soul=await self.current(me["team_id"], me["agent_name"]))
        return m.SoulReply(soul=self.document(me["agent_name"], self._parse(msg.content)))
