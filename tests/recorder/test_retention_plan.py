"""The recorder's retention decision table and summary status, row by row (no I/O)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from dovecote.recorder.retention import compact, plan_subject, summarize, timeline_line

NOW = dt.datetime(2026, 4, 15, 12, 0, tzinfo=dt.UTC)
LATER, EARLIER = NOW + dt.timedelta(hours=1), NOW - dt.timedelta(seconds=1)


@pytest.mark.parametrize(("state", "pinned", "decision", "kind"), [
    ("open", None, "keep", ""),
    ("open", EARLIER, "keep", ""),
    ("closed", None, "drop", "ephemeral_evidence"),
    ("closed", LATER, "keep", ""),
    ("closed", NOW, "drop", "expired_postmortem_pin"),
    ("closed", EARLIER, "drop", "expired_postmortem_pin"),
    ("dropped", None, "none", ""),
    ("dropped", EARLIER, "none", ""),
])
def test_plan_subject(state: str, pinned: dt.datetime | None, decision: str, kind: str) -> None:
    plan = plan_subject(state, pinned, NOW)
    assert (plan.decision, plan.kind) == (decision, kind)


def _row(**kw: Any) -> dict[str, Any]:
    row = {"state": "open", "pinned_until": None, "last_seq": 3, "last_captured_at": NOW,
           "exported_seq": None, "entry_bytes": 900, "drop_reason": None}
    row.update(kw)
    return row


@pytest.mark.parametrize(("row", "status"), [
    (_row(), "active"),
    (_row(last_captured_at=NOW - dt.timedelta(seconds=61)), "idle"),
    (_row(state="closed"), "idle"),
    (_row(exported_seq=3), "exported"),
    (_row(exported_seq=2), "active"),
    (_row(state="dropped", drop_reason="gone"), "unavailable"),
])
def test_summary_status(row: dict[str, Any], status: str) -> None:
    summary = summarize(row, screenshot_count=2, screenshot_bytes=100, exported_bundle=None,
                        now=NOW, active_window_s=60)
    assert summary.status == status
    assert summary.mode == ("unavailable" if status == "unavailable" else "sparse_timeline")


def test_a_huge_receipt_still_makes_a_small_timeline_entry() -> None:
    summary = compact({"receipt": {"result": {"stdout": "x" * 100_000, "lines": list(range(500))}}})
    line = timeline_line({"seq": 1, "at": NOW, "kind": "action", "actor": "a", "summary": summary,
                          "screenshot_sha256": "0" * 64})
    assert len(line) < 1024
