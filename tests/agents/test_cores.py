"""The agents service's pure cores, tested as tables: lease decisions, sweeps, spawn rules, souls, context."""

from __future__ import annotations

import pytest

from dovecote.bus.messages import agents as m
from dovecote.services.agents import context as C
from dovecote.services.agents import lease as L
from dovecote.services.agents import lineage as G
from dovecote.services.agents import soul as S
from dovecote.services.agents.errors import BudgetExceeded, Forbidden, LeaseConflict, Unprocessable

NOW = 1_000.0
ME, OTHER = "as_me", "as_other"

# (status, holder, lease_until, failure_kind, action, expected outcome or error code)
LEASE_TABLE = [
    ("claimed", ME, NOW + 10, None, "heartbeat", "claimed"),
    ("claimed", ME, NOW + 10, None, "complete", "completed"),
    ("claimed", ME, NOW + 10, None, "fail", "failed"),
    ("claimed", ME, NOW + 10, None, "release", "queued"),
    ("claimed", ME, NOW, None, "heartbeat", "lease_expired"),
    ("claimed", ME, NOW - 1, None, "complete", "lease_expired"),
    ("queued", ME, NOW - 1, None, "fail", "lease_expired"),
    ("failed", ME, NOW - 1, "lease_expired", "heartbeat", "lease_expired"),
    ("claimed", OTHER, NOW + 10, None, "complete", "lease_not_active"),
    ("claimed", OTHER, NOW - 10, None, "heartbeat", "lease_not_active"),
    ("completed", ME, NOW + 10, None, "complete", "lease_not_active"),
    ("failed", ME, NOW + 10, "agent_reported", "fail", "lease_not_active"),
    ("queued", None, None, None, "heartbeat", "lease_not_active"),
    ("queued", OTHER, NOW - 1, None, "release", "lease_not_active"),
]


@pytest.mark.parametrize(("status", "holder", "until", "kind", "action", "expected"), LEASE_TABLE)
def test_lease_decision_table(
    status: str, holder: str | None, until: float | None, kind: str | None, action: L.Action, expected: str
) -> None:
    view = L.LeaseView(status=status, session_id=holder, lease_until=until, failure_kind=kind)
    if expected in ("lease_expired", "lease_not_active"):
        with pytest.raises(LeaseConflict) as info:
            L.decide(view, ME, action, NOW)
        assert info.value.code == expected and info.value.status == 409
        assert info.value.message == (
            "lease expired" if expected == "lease_expired" else "not an active lease"
        )
    else:
        assert L.decide(view, ME, action, NOW) == expected


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(None, 300.0), (1, 1.0), (3600, 3600.0), (0, None), (-5, None), (3600.5, None)],
)
def test_lease_seconds_are_bounded(requested: float | None, expected: float | None) -> None:
    if expected is None:
        with pytest.raises(Unprocessable) as info:
            L.lease_seconds(requested, default=300, maximum=3600)
        assert info.value.status == 422
    else:
        assert L.lease_seconds(requested, default=300, maximum=3600) == expected


def test_sweep_plan_table() -> None:
    rows = [
        L.SweepRow(id="live", status="claimed", lease_until=NOW + 1, attempt=1, max_attempts=3),
        L.SweepRow(id="again", status="claimed", lease_until=NOW - 1, attempt=1, max_attempts=3),
        L.SweepRow(id="edge", status="claimed", lease_until=NOW, attempt=2, max_attempts=3),
        L.SweepRow(id="last", status="claimed", lease_until=NOW - 1, attempt=3, max_attempts=3),
        L.SweepRow(id="done", status="completed", lease_until=NOW - 1, attempt=1, max_attempts=3),
        L.SweepRow(id="queued", status="queued", lease_until=None, attempt=1, max_attempts=3),
    ]
    plan = L.plan_sweep(rows, NOW)
    assert plan.requeue == ["again", "edge"]
    assert plan.fail == ["last"]


PARENT = {
    "tools": ["read", "write"],
    "network_channels": ["*"],
    "skills": [],
    "mcp_servers": ["git"],
    "sandbox_profiles": ["small"],
    "workspace_paths": ["/w"],
}

# (requested, expected child policy fields, or the field refused)
NARROW_TABLE = [
    (None, PARENT, None),
    ({"tools": ["read"]}, {**PARENT, "tools": ["read"]}, None),
    ({"tools": []}, {**PARENT, "tools": []}, None),
    ({"network_channels": ["egress", "*"]}, {**PARENT, "network_channels": ["egress", "*"]}, None),
    ({"tools": ["read", "exec"]}, None, "tools"),
    ({"skills": ["x"]}, None, "skills"),
    ({"tools": ["*"]}, None, "tools"),
    ({"tools": None, "sandbox_profiles": ["small"]}, PARENT, None),
]


@pytest.mark.parametrize(("requested", "expected", "refused"), NARROW_TABLE)
def test_permissions_only_narrow(
    requested: dict[str, list[str] | None] | None, expected: dict[str, list[str]] | None, refused: str | None
) -> None:
    if refused:
        with pytest.raises(Forbidden) as info:
            G.narrow(PARENT, requested)
        assert info.value.status == 403 and info.value.details["field"] == refused
    else:
        assert G.narrow(PARENT, requested) == expected


BUDGET = G.Budget(max_children=2, max_depth=2, max_active_per_workspace=5)

# (parent depth, active children, active in workspace, refused budget or None)
BUDGET_TABLE = [
    (0, 0, 1, None),
    (1, 1, 4, None),
    (2, 0, 1, "max_depth"),
    (0, 2, 3, "max_children"),
    (0, 1, 5, "max_active_per_workspace"),
    (2, 2, 5, "max_depth"),  # the first rule that fails is named
]


@pytest.mark.parametrize(("depth", "children", "active", "refused"), BUDGET_TABLE)
def test_spawn_budget_table(depth: int, children: int, active: int, refused: str | None) -> None:
    counts = G.SpawnCounts(parent_depth=depth, active_children=children, active_in_workspace=active)
    if refused is None:
        G.check_spawn(BUDGET, counts)
    else:
        with pytest.raises(BudgetExceeded) as info:
            G.check_spawn(BUDGET, counts)
        assert info.value.code == refused and info.value.status == 409


def test_effective_budget_is_the_smaller_and_ttl_is_capped_by_the_parent() -> None:
    mine = G.Budget(max_children=1, max_depth=9, max_active_per_workspace=3)
    coord = G.Budget(max_children=4, max_depth=2, max_active_per_workspace=64, ttl_seconds=30)
    assert G.effective_budget(mine, coord) == G.Budget(
        max_children=1, max_depth=2, max_active_per_workspace=3, ttl_seconds=30
    )
    assert G.ttl_expiry(None, 0, NOW, None) is None
    assert G.ttl_expiry(10, 0, NOW, None) == NOW + 10
    assert G.ttl_expiry(None, 60, NOW, None) == NOW + 60
    assert G.ttl_expiry(100, 0, NOW, NOW + 5) == NOW + 5
    assert G.ttl_expiry(None, 0, NOW, NOW + 5) == NOW + 5


def test_stop_order_is_children_first_each_once_and_respects_auto_stop() -> None:
    #   root ─┬─ a (auto) ─┬─ a1 (auto)
    #         │            └─ a2 (not auto) ── a2x (auto)
    #         ├─ b (auto, already stopped) ── b1 (auto)
    #         └─ c (not auto)
    nodes = [
        G.Node(id="root", parent_id=None, auto_stop_on_parent=True, stopped=False),
        G.Node(id="a", parent_id="root", auto_stop_on_parent=True, stopped=False),
        G.Node(id="a1", parent_id="a", auto_stop_on_parent=True, stopped=False),
        G.Node(id="a2", parent_id="a", auto_stop_on_parent=False, stopped=False),
        G.Node(id="a2x", parent_id="a2", auto_stop_on_parent=True, stopped=False),
        G.Node(id="b", parent_id="root", auto_stop_on_parent=True, stopped=True),
        G.Node(id="b1", parent_id="b", auto_stop_on_parent=True, stopped=False),
        G.Node(id="c", parent_id="root", auto_stop_on_parent=False, stopped=False),
    ]
    assert G.stop_order("root", nodes) == ["a1", "a", "b1", "root"]
    assert G.stop_order("a2", nodes) == ["a2x", "a2"]
    assert G.stop_order("b", nodes) == ["b1"]


GOOD_SOUL = """---
role: reviewer
tone: [direct, kind]
principles:
  - read the whole diff
tags: review
version: 2
---
# Notes
Be brief.
"""

# (document, expected valid, expected diagnostics as (code, line, column, field, severity))
SOUL_TABLE = [
    (GOOD_SOUL, True, []),
    ("no front matter\n", False, [("frontmatter_missing", 1, 1, "", "error")]),
    ("---\nrole: x\n", False, [("frontmatter_unterminated", 1, 1, "", "error")]),
    ("---\nrole: x\ntone: [a\n---\nbody\n", False, [("frontmatter_yaml", 4, 1, "", "error")]),
    ("---\n- a\n---\n", False, [("frontmatter_not_mapping", 2, 1, "", "error")]),
    ("---\nrole: x\n  mood: happy\n---\n", False, [("frontmatter_yaml", 3, 7, "", "error")]),
    ("---\nrole: x\nmood: happy\n---\n", True, [("unknown_field", 3, 1, "mood", "warning")]),
    (
        "---\nrole: [a]\nprinciples: {a: 1}\n---\n",
        False,
        [("invalid_type", 2, 1, "role", "error"), ("invalid_type", 3, 1, "principles", "error")],
    ),
    ("---\ntone: [a]\n---\n", True, [("role_missing", 2, 1, "role", "warning")]),
    ("---\nrole: x\n---\n" + "b" * 40, True, [("body_truncated", 4, 1, "", "warning")]),
    ("x" * 300, False, [("soul_too_large", 1, 1, "", "error")]),
]


@pytest.mark.parametrize(("text", "valid", "diagnostics"), SOUL_TABLE)
def test_soul_validation_table(
    text: str, valid: bool, diagnostics: list[tuple[str, int, int, str, str]]
) -> None:
    parsed = S.parse(text, max_bytes=200 if len(text) > 250 else 4096, max_body_bytes=32)
    got = [(d.code, d.line, d.column, d.field, d.severity) for d in parsed.diagnostics]
    assert got == diagnostics
    assert parsed.valid is valid
    assert parsed.digest.startswith("sha256:") and len(parsed.digest) == 71


def test_soul_front_matter_values() -> None:
    parsed = S.parse(GOOD_SOUL, max_bytes=4096, max_body_bytes=4096)
    assert parsed.frontmatter == m.SoulFrontmatter(
        role="reviewer",
        tone=["direct", "kind"],
        principles=["read the whole diff"],
        tags=["review"],
        version="2",
    )
    assert parsed.body == "# Notes\nBe brief.\n"


def _session(sid: str, caps: list[str] | None = None) -> m.Session:
    lineage = m.Lineage(
        auto_stop_on_parent=True,
        parent_session_id=None,
        permission_policy=m.PermissionPolicy(),
        root_session_id=sid,
        spawn_budget=m.SpawnBudget(max_active_per_workspace=1, max_children=1, max_depth=1),
        spawn_depth=0,
        spawn_role="",
        ttl_expires_at=None,
    )
    return m.Session(
        id=sid,
        agent_name="a-" + sid,
        name="",
        channel="",
        provider="",
        model="",
        state="active",
        type="user",
        workspace_id="ws",
        created_at="t",
        updated_at="t",
        lineage=lineage,
        capabilities=caps or [],
    )


def _message(i: int, body: object) -> m.ChannelMessage:
    md = m.MessageMetadata(
        coordination_channel_id="ch", correlation_id="c", message_kind="status", run_id="r", task_id="t"
    )
    return m.ChannelMessage(
        message_id=f"msg{i}",
        channel_id="ch",
        from_session_id="other",
        to_session_id=None,
        metadata=md,
        body=body,
        timestamp="t",
    )


def test_context_sections_report_limit_returned_truncated() -> None:
    soul_doc = m.Soul(
        active=True,
        agent_name="a",
        body="",
        config_provenance=m.SoulProvenance(
            context_projection_bytes=40, digest="d", enabled=True, max_body_bytes=1, source="s"
        ),
        created_at=None,
        diagnostics=[],
        digest="sd",
        enabled=True,
        frontmatter=m.SoulFrontmatter(role="r", tone=["t1", "t2"], principles=["p" * 10, "q" * 10]),
        limits=m.SoulLimits(context_projection_bytes=40, max_body_bytes=1, max_bytes=1),
        present=True,
        revision_id="rev",
        snapshot_id="rev",
        source_path="",
        truncated=False,
        valid=True,
        validation_status="valid",
    )
    inp = C.ContextInputs(
        session=_session("me", ["c", "b", "a"]),
        workspace=m.Workspace(id="ws", name="w", root_dir=""),
        soul=soul_doc,
        leases=[],
        named_channel=None,
        inbox=[_message(1, "x" * 500), _message(2, {"k": 1})],
        unread_count=5,
        peers=[_session("me"), _session("p1"), _session("p2"), _session("p3")],
        limits=m.Limits(context_section_limit=2, max_active_task_leases=1, max_children=1, max_spawn_depth=1),
        soul_projection_bytes=40,
        generated_at="now",
    )
    ctx = C.project(inp)
    assert [c.id for c in ctx.capabilities.capabilities] == ["a", "b"]
    assert ctx.capabilities.section == m.Section(limit=2, returned=2, truncated=True)
    assert [p.session_id for p in ctx.peer_roster.peers] == ["p1", "p2"]
    assert ctx.peer_roster.section == m.Section(limit=2, returned=2, truncated=True)
    assert ctx.inbox_summary.unread_count == 5 and ctx.inbox_summary.section.truncated
    assert len(ctx.inbox_summary.items[0].preview) == C.PREVIEW_CHARS
    assert ctx.inbox_summary.items[1].preview == '{"k":1}'
    assert not ctx.task.available and ctx.task.bundle is None and not ctx.coordination_channel.available
    assert ctx.soul.truncated and ctx.soul.role == "r" and len(ctx.soul.principles) < 2
    assert ctx.provenance == m.Provenance(generated_at="now", source=C.SOURCE)
    few = C.project(C.ContextInputs(**{**inp.__dict__, "peers": [], "inbox": [], "unread_count": 0}))
    assert few.peer_roster.section == m.Section(limit=2, returned=0, truncated=False)
