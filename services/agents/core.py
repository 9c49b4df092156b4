"""What every part of the agents service shares: config, database, clock, events, wake-ups.

Long polls (``recv?wait=``, ``claim-next`` with ``wait``) wait on in-process
wake-ups (:class:`WakeUps`): a send wakes its channel's readers, a queued or
requeued run its workspace's claimers. A waiter always re-reads the database
after waking (and at its deadline), so a missed or spurious wake-up costs
latency, never correctness. The service runs as one process; with several,
a waiter would still see the other process's work at its deadline.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import trio
from psycopg.types.json import Jsonb

from dovecote.bus.messages.agents import Ref
from dovecote.bus.messages.common import Principal
from dovecote.libs.config import BaseConfig
from dovecote.libs.db import Connection, Database
from dovecote.libs.timefmt import unix_rfc3339
from dovecote.services.agents.batch import GroupCommit

Positive = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]

CLAIM_TOKEN_PREFIX = "clm_"
AGENT_TOKEN_PREFIX = "agt_"


class AgentsConfig(BaseConfig, kw_only=True):
    """Settings of the agents service (``DOVECOTE_AGENTS_*`` variables)."""

    agents_lease_default_s: PositiveFloat = 300.0
    """Lease length of a claim or heartbeat that names none."""
    agents_lease_max_s: PositiveFloat = 3600.0
    """Longest lease an agent may ask for (422 beyond)."""
    agents_max_attempts: Positive = 3
    """Attempts of a run before an expired lease fails it."""
    agents_sweep_every_s: PositiveFloat = 1.0
    """How often expired leases and session TTLs are swept."""
    agents_wait_max_s: PositiveFloat = 25.0
    """Longest long poll (``recv?wait``, ``claim-next`` with ``wait``)."""
    agents_max_active_leases: Positive = 8
    """Leases one session may hold at once."""
    agents_max_children: Positive = 8
    agents_max_depth: Positive = 3
    agents_max_active_per_workspace: Positive = 64
    agents_default_ttl_s: Annotated[int, msgspec.Meta(ge=0)] = 0
    """TTL of sessions that name none (0: none)."""
    agents_context_section_limit: Positive = 20
    agents_soul_max_bytes: Positive = 65536
    agents_soul_max_body_bytes: Positive = 32768
    agents_soul_projection_bytes: Positive = 4096
    agents_message_max_bytes: Positive = 65536
    agents_event_queue: Positive = 10000
    """Lifecycle events waiting for the notifier; beyond, new ones are dropped (and counted)."""
    agents_identity_cache_s: Annotated[float, msgspec.Meta(ge=0)] = 2.0


def iso_now(clock: Callable[[], float] = time.time) -> str:
    """RFC 3339 text of ``clock()`` (the service's clock, which tests move)."""
    return unix_rfc3339(clock())


def at(seconds: float) -> datetime:
    """Unix seconds as an aware datetime (for SQL parameters)."""
    return datetime.fromtimestamp(seconds, UTC)


def epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(10)


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def operator_ref(actor: Principal) -> Ref:
    if actor.auth_type == "api_key":
        return Ref(kind="api_key", ref=actor.api_key_id)
    return Ref(kind="human", ref=actor.user_id)


def agent_ref(session_id: str) -> Ref:
    return Ref(kind="agent_session", ref=session_id)


def audit(
    conn: Connection,
    team_id: str,
    actor: Ref,
    action: str,
    resource_type: str,
    resource_id: str,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Append one audit entry in the caller's transaction."""
    conn.execute(
        "INSERT INTO audit_log (team_id, actor_kind, actor_id, action, resource_type, resource_id, metadata) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (team_id, actor.kind, actor.ref, action, resource_type, resource_id, Jsonb(metadata or {})),
    )


class WakeUps:
    """One event per key, replaced each time it fires: take it, re-read, then wait on it."""

    def __init__(self) -> None:
        self._events: dict[str, trio.Event] = {}

    def event(self, key: str) -> trio.Event:
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = trio.Event()
        return ev

    def fire(self, key: str) -> None:
        ev = self._events.pop(key, None)
        if ev is not None:
            ev.set()


class Agents:
    """The service's shared state, handed to each resource module."""

    def __init__(
        self, db: Database, config: AgentsConfig, events: Any, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.config = config
        self.events = events
        self.clock = clock
        self.channel_wakeups = WakeUps()
        self.work_wakeups = WakeUps()
        self.group = GroupCommit(db)
        """The hot lease statements, run in batches (:mod:`.batch`; its ``serve`` runs in the nursery)."""

    def wait_bound(self, requested: float) -> float:
        return max(0.0, min(float(requested), self.config.agents_wait_max_s))


def find_claim_token(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds a ``claim_token`` key or a raw claim token anywhere."""
    if depth > 32:
        return False
    if isinstance(value, str):
        return value.startswith(CLAIM_TOKEN_PREFIX) and len(value) >= len(CLAIM_TOKEN_PREFIX) + 32
    if isinstance(value, dict):
        return any(
            str(k).lower() == "claim_token" or find_claim_token(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list):
        return any(find_claim_token(v, depth + 1) for v in value)
    return False
