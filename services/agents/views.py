"""Rows of the agents schema as the reference's JSON objects."""

from __future__ import annotations

from typing import Any

import msgspec

from dovecote.bus.messages import agents as m
from dovecote.libs.timefmt import rfc3339
from dovecote.services.agents.lineage import POLICY_FIELDS

LEASE_STATUSES = {"claimed", "completed", "failed", "queued"}


def policy(value: dict[str, Any]) -> m.PermissionPolicy:
    return m.PermissionPolicy(**{k: list(value.get(k, [])) for k in POLICY_FIELDS})


def budget(value: dict[str, Any]) -> m.SpawnBudget:
    return msgspec.convert(value, m.SpawnBudget)


def lineage(row: dict[str, Any]) -> m.Lineage:
    return m.Lineage(
        auto_stop_on_parent=row["auto_stop_on_parent"],
        parent_session_id=row["parent_session_id"],
        permission_policy=policy(row["permission_policy"]),
        root_session_id=row["root_session_id"],
        spawn_budget=budget(row["spawn_budget"]),
        spawn_depth=row["spawn_depth"],
        spawn_role=row["spawn_role"],
        ttl_expires_at=rfc3339(row["ttl_expires_at"]),
    )


def session(row: dict[str, Any]) -> m.Session:
    return m.Session(
        id=row["id"],
        agent_name=row["agent_name"],
        name=row["name"],
        channel=row["channel"],
        provider=row["provider"],
        model=row["model"],
        state=row["state"],
        type=row["type"],
        workspace_id=row["workspace_id"],
        created_at=rfc3339(row["created_at"]) or "",
        updated_at=rfc3339(row["updated_at"]) or "",
        lineage=lineage(row),
        capabilities=list(row["capabilities"]),
        stop_reason=row["stop_reason"],
        stop_detail=row["stop_detail"],
        capsule_id=row.get("capsule_id"),
    )


def workspace(row: dict[str, Any]) -> m.Workspace:
    return m.Workspace(
        id=row["id"], name=row["name"], root_dir=row["root_dir"], created_at=rfc3339(row["created_at"]) or ""
    )


def channel(row: dict[str, Any]) -> m.Channel:
    return m.Channel(
        id=row["id"],
        channel=row["channel"],
        display_name=row["display_name"],
        purpose=row["purpose"],
        allowed_message_kinds=list(row["allowed_message_kinds"]),
        last_activity_at=rfc3339(row["last_activity_at"]),
        run_id=row["run_id"],
        task_id=row["task_id"],
        workflow_id=None,
        workspace_id=row["workspace_id"],
    )


def message(row: dict[str, Any]) -> m.ChannelMessage:
    return m.ChannelMessage(
        message_id=row["id"],
        channel_id=row["channel_id"],
        from_session_id=row["from_session_id"],
        to_session_id=row["to_session_id"],
        metadata=msgspec.convert(row["metadata"], m.MessageMetadata),
        body=row["body"],
        timestamp=rfc3339(row["created_at"]) or "",
    )


def task(row: dict[str, Any]) -> m.Task:
    return m.Task(
        id=row["id"],
        identifier=row["identifier"],
        workspace_id=row["workspace_id"],
        title=row["title"],
        description=row["description"],
        priority=row["priority"],
        status=row["status"],
        scope="workspace",
        owner=m.Ref(kind=row["owner_kind"], ref=row["owner_ref"]),
        paused=False,
        effective_paused=False,
        paused_by_task_id=None,
        latest_event_seq=0,
        network_channel=row["network_channel"],
        required_capabilities=list(row["required_capabilities"]),
        created_at=rfc3339(row["created_at"]) or "",
        updated_at=rfc3339(row["updated_at"]) or "",
    )


def _claimed_by(row: dict[str, Any]) -> m.Ref | None:
    return m.Ref(kind="agent_session", ref=row["session_id"]) if row["session_id"] else None


def run(row: dict[str, Any], chan: m.Channel | None = None) -> m.Run:
    return m.Run(
        id=row["id"],
        task_id=row["task_id"],
        status=row["status"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        claim_token_hash=row["claim_token_hash"],
        claimed_at=rfc3339(row["claimed_at"]),
        claimed_by=_claimed_by(row),
        coordination_channel_id=row["coordination_channel_id"],
        coordination_channel=chan,
        ended_at=rfc3339(row["ended_at"]),
        error=row["error"],
        failure_kind=row["failure_kind"],
        heartbeat_at=rfc3339(row["heartbeat_at"]),
        idempotency_key=row["idempotency_key"],
        lease_until=rfc3339(row["lease_until"]),
        metadata=None,
        network_channel=row["network_channel"],
        origin=m.Origin(kind=row["origin_kind"], ref=row["origin_ref"]),
        previous_run_id=None,
        queued_at=rfc3339(row["queued_at"]) or "",
        result=row["result"],
        session_id=row["session_id"],
        started_at=rfc3339(row["started_at"]),
    )


def lease(row: dict[str, Any], chan: m.Channel | None = None) -> m.Lease:
    status: m.LeaseStatus = row["status"] if row["status"] in LEASE_STATUSES else "failed"
    return m.Lease(
        claim_token_hash=row["claim_token_hash"],
        claimed_by=_claimed_by(row),
        coordination_channel=chan,
        coordination_channel_id=row["coordination_channel_id"],
        heartbeat_at=rfc3339(row["heartbeat_at"]),
        lease_until=rfc3339(row["lease_until"]),
        run_id=row["id"],
        session_id=row["session_id"],
        status=status,
        task_id=row["task_id"],
    )
