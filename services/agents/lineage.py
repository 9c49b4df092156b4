"""Spawn rules and session lineage, without I/O.

A session spawned by another gets lineage (``root_session_id``,
``parent_session_id``, ``spawn_depth`` = parent's + 1, ``spawn_role``), a
permission policy that can only narrow its parent's, a spawn budget and an
optional TTL. :func:`check_spawn` decides, in this order:

======================================================  ==============================
situation                                               answer
======================================================  ==============================
parent's depth + 1 > max_depth                          409 ``max_depth``
parent's active children >= max_children                409 ``max_children``
workspace's active sessions >= max_active_per_workspace 409 ``max_active_per_workspace``
a requested permission outside the parent's             403 ``permission_not_narrower``
otherwise                                               the child's policy and budget
======================================================  ==============================

Budgets: the effective limit is the smaller of the parent's own
``spawn_budget`` and the workspace coordinator's setting, and a child's
budget never exceeds its parent's. Permissions: each policy field is a list
of names; ``"*"`` means any. A child's list must be a subset of its
parent's (anything under ``"*"``); an omitted field inherits the parent's.

A TTL ends a session at ``ttl_expires_at`` (a child never outlives a parent
that has one). Stopping a session stops its descendants that have
``auto_stop_on_parent``, deepest first (:func:`stop_order`), each once; a
child without it keeps running, and so do its descendants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dovecote.services.agents.errors import BudgetExceeded, Forbidden

ANY = "*"
POLICY_FIELDS = ("mcp_servers", "network_channels", "sandbox_profiles", "skills", "tools", "workspace_paths")
Policy = dict[str, list[str]]


def full_policy() -> Policy:
    """What an operator-created session may do when nothing narrower is given."""
    return {name: [ANY] for name in POLICY_FIELDS}


def allows(policy: Mapping[str, Sequence[str]], field: str, item: str) -> bool:
    """Whether ``policy`` permits ``item`` in ``field``."""
    granted = policy.get(field, [])
    return ANY in granted or item in granted


def narrow(
    parent: Mapping[str, Sequence[str]], requested: Mapping[str, Sequence[str] | None] | None
) -> Policy:
    """The child's policy: ``requested`` if it is within ``parent``, else 403."""
    child: Policy = {}
    for name in POLICY_FIELDS:
        granted = list(parent.get(name, []))
        asked = None if requested is None else requested.get(name)
        if asked is None:
            child[name] = granted
            continue
        wider = [item for item in asked if not (ANY in granted or (item != ANY and item in granted))]
        if wider:
            raise Forbidden(
                f"permission {name} {wider!r} is not granted to the parent session",
                code="permission_not_narrower",
                details={"field": name, "items": wider},
            )
        child[name] = sorted(set(asked), key=list(asked).index)
    return child


@dataclass(frozen=True, kw_only=True)
class Budget:
    max_children: int
    max_depth: int
    max_active_per_workspace: int
    ttl_seconds: int = 0


@dataclass(frozen=True, kw_only=True)
class SpawnCounts:
    parent_depth: int
    active_children: int
    active_in_workspace: int


def effective_budget(parent: Budget, coordinator: Budget) -> Budget:
    """The smaller of the parent's budget and the coordinator's, field by field."""
    return Budget(
        max_children=min(parent.max_children, coordinator.max_children),
        max_depth=min(parent.max_depth, coordinator.max_depth),
        max_active_per_workspace=min(parent.max_active_per_workspace, coordinator.max_active_per_workspace),
        ttl_seconds=parent.ttl_seconds or coordinator.ttl_seconds,
    )


def check_spawn(budget: Budget, counts: SpawnCounts) -> None:
    """Raise BudgetExceeded (409) if a spawn would go over ``budget``."""
    if counts.parent_depth + 1 > budget.max_depth:
        raise BudgetExceeded(
            f"spawn depth {counts.parent_depth + 1} is over max_depth {budget.max_depth}",
            code="max_depth",
            details={"max_depth": budget.max_depth},
        )
    if counts.active_children >= budget.max_children:
        raise BudgetExceeded(
            f"the session already has {counts.active_children} active children "
            f"(max_children {budget.max_children})",
            code="max_children",
            details={"max_children": budget.max_children},
        )
    if counts.active_in_workspace >= budget.max_active_per_workspace:
        raise BudgetExceeded(
            f"the workspace already has {counts.active_in_workspace} active sessions "
            f"(max_active_per_workspace {budget.max_active_per_workspace})",
            code="max_active_per_workspace",
            details={"max_active_per_workspace": budget.max_active_per_workspace},
        )


def ttl_expiry(requested: int | None, default: int, now: float, parent_expires: float | None) -> float | None:
    """When the child ends (Unix seconds) or None: ``requested`` (else ``default``), capped by the parent."""
    seconds = requested if requested is not None else default
    expires = now + seconds if seconds and seconds > 0 else None
    if parent_expires is not None:
        expires = parent_expires if expires is None else min(expires, parent_expires)
    return expires


@dataclass(frozen=True, kw_only=True)
class Node:
    id: str
    parent_id: str | None
    auto_stop_on_parent: bool
    stopped: bool


def stop_order(root: str, nodes: Sequence[Node]) -> list[str]:
    """The sessions to stop when ``root`` stops: its auto-stopping descendants deepest first, then root.

    Already-stopped sessions are not stopped again (their descendants are
    still visited: a stopped middle session's auto-stop children go too).
    """
    children: dict[str, list[Node]] = {}
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        if n.parent_id is not None:
            children.setdefault(n.parent_id, []).append(n)
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:  # a cycle cannot happen in lineage, but never loop
            return
        seen.add(node_id)
        for child in children.get(node_id, []):
            if child.auto_stop_on_parent:
                visit(child.id)
        node = by_id.get(node_id)
        if node is not None and not node.stopped:
            order.append(node_id)

    visit(root)
    return order
