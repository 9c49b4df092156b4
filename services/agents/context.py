"""The context projection, without I/O: what an agent is told about its situation.

:func:`project` assembles ``GET /api/agent/context`` from what the service
read (:class:`ContextInputs`). Every list section is cut to ``limit`` items
and says so::

    ============================  ==========================================
    section                       content (order)
    ============================  ==========================================
    capabilities                  the session's capabilities (sorted)
    peer_roster                   other active sessions of the workspace (oldest first)
    inbox_summary                 unread messages to the session (newest first),
                                  ``unread_count`` counts all of them
    task                          the lease held (earliest lease_until), its task and run
    coordination_channel          that lease's channel, else the session's named channel
    soul                          front matter digest: role, tone, principles
    ============================  ==========================================

A section's ``section`` object is ``{limit, returned, truncated}``;
``truncated`` is true when items were left out. Previews are cut to
:data:`PREVIEW_CHARS` characters; the soul's lists are cut so the projection
stays within ``context_projection_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from dovecote.bus.messages import agents as m

T = TypeVar("T")
PREVIEW_CHARS = 160
SOURCE = "dovecote.agents"


def section(items: Sequence[T], limit: int, total: int | None = None) -> tuple[list[T], m.Section]:
    """The first ``limit`` items and their section info (``total`` if more exist than were read)."""
    kept = list(items[:limit])
    count = len(items) if total is None else total
    return kept, m.Section(limit=limit, returned=len(kept), truncated=count > len(kept))


def preview(body: Any) -> str:
    text = body if isinstance(body, str) else msgspec.json.encode(body).decode()
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def soul_projection(soul: m.Soul, projection_bytes: int) -> m.SoulProjection:
    """The soul's front matter as the context shows it, within ``projection_bytes``."""
    tone, principles = list(soul.frontmatter.tone), list(soul.frontmatter.principles)
    truncated = soul.truncated

    def size() -> int:
        return len(msgspec.json.encode([soul.frontmatter.role, tone, principles]))

    while size() > projection_bytes and (principles or tone):
        (principles if principles else tone).pop()
        truncated = True
    return m.SoulProjection(
        active=soul.active,
        config_digest=soul.config_provenance.digest,
        digest=soul.digest,
        enabled=soul.enabled,
        max_body_bytes=soul.limits.max_body_bytes,
        max_bytes=soul.limits.max_bytes,
        present=soul.present,
        principles=principles,
        role=soul.frontmatter.role,
        snapshot_id=soul.snapshot_id,
        source_path=soul.source_path,
        tone=tone,
        truncated=truncated,
        valid=soul.valid,
        validation_status=soul.validation_status,
    )


@dataclass(kw_only=True)
class ContextInputs:
    session: m.Session
    workspace: m.Workspace
    soul: m.Soul
    leases: list[tuple[m.Lease, m.Run, m.Task]]
    named_channel: m.Channel | None
    inbox: list[m.ChannelMessage]
    unread_count: int
    peers: list[m.Session]
    limits: m.Limits
    soul_projection_bytes: int
    generated_at: str


def project(inp: ContextInputs) -> m.Context:
    """Assemble the context (see the module's table)."""
    limit = inp.limits.context_section_limit
    s = inp.session
    caps, caps_section = section(
        [m.Capability(id=c, source="session", summary="") for c in sorted(s.capabilities)], limit
    )
    peers, peers_section = section(
        [
            m.Peer(
                capabilities=list(p.capabilities),
                channel_id=None,
                display_name=p.name or p.agent_name,
                peer_id=p.agent_name,
                session_id=p.id,
            )
            for p in inp.peers
            if p.id != s.id
        ],
        limit,
    )
    items, inbox_section = section(
        [
            m.InboxItem(
                channel_id=msg.channel_id,
                kind=msg.metadata.message_kind,
                message_id=msg.message_id,
                metadata=msg.metadata,
                preview=preview(msg.body),
                timestamp=msg.timestamp,
            )
            for msg in inp.inbox
        ],
        limit,
        total=inp.unread_count,
    )
    if inp.leases:
        lease, run, task = min(inp.leases, key=lambda held: held[0].lease_until or "")
        bundle = m.TaskBundle(
            current_run=run,
            handoff_summary="",
            latest_event_seq=0,
            limits=m.TaskLimits(
                context_body_max_bytes=inp.soul_projection_bytes,
                max_runtime_seconds=0,
                summary_max_bytes=PREVIEW_CHARS,
            ),
            prior_attempts=[],
            recent_events=[],
            task=task,
        )
        task_section = m.TaskSection(available=True, bundle=bundle, lease=lease, task=task)
        channel = lease.coordination_channel
    else:
        task_section = m.TaskSection(available=False, bundle=None, lease=None, task=None)
        channel = inp.named_channel
    return m.Context(
        capabilities=m.CapabilitiesSection(capabilities=caps, section=caps_section),
        coordination_channel=m.ChannelSection(available=channel is not None, channel=channel),
        inbox_summary=m.InboxSummary(items=items, section=inbox_section, unread_count=inp.unread_count),
        limits=inp.limits,
        peer_roster=m.PeerRoster(peers=peers, section=peers_section),
        provenance=m.Provenance(generated_at=inp.generated_at, source=SOURCE),
        self=m.SelfInfo(agent_name=s.agent_name, model=s.model, provider=s.provider, session_id=s.id),
        session=m.ContextSession(
            channel=s.channel,
            created_at=s.created_at,
            id=s.id,
            lineage=s.lineage,
            name=s.name,
            state=s.state,
            type=s.type,
            updated_at=s.updated_at,
        ),
        soul=soul_projection(inp.soul, inp.soul_projection_bytes),
        task=task_section,
        workspace=inp.workspace,
    )
