"""Pure decisions of the recorder: a subject's summary, what retention keeps, how big an entry is.

Nothing here does I/O; :mod:`.evidence` feeds it rows and the clock.

Retention (:func:`plan_subject`), as a decision table over a subject's state:

=========  ===================  ======================================================
state      pinned_until         decision
=========  ===================  ======================================================
open       any                  keep: the subject is live
closed     none                 drop: ``ephemeral_until_export`` (deleted with its
                                session; normally at once, reclaim catches leftovers)
closed     later than now       keep: ``temporary_postmortem_pin`` holds it
closed     now or earlier       drop: the post-mortem pin expired
dropped    any                  nothing left to drop
=========  ===================  ======================================================

Exported bundles are outside this table: Dovecote never deletes them.

Summary status (:func:`summarize`): ``exported`` when the latest export covers
every entry; else ``active`` when the subject is open and captured something
within ``active_window_s``; else ``idle``. A dropped subject is ``unavailable``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from dovecote.bus.messages.recorder import BundleRef, ReviewSummary
from dovecote.libs.timefmt import rfc3339

Decision = Literal["keep", "drop", "none"]


@dataclass(frozen=True, slots=True)
class SubjectPlan:
    decision: Decision
    kind: str = ""
    reason: str = ""


def plan_subject(state: str, pinned_until: dt.datetime | None, now: dt.datetime) -> SubjectPlan:
    """What retention does with a subject's runtime evidence (see the module's table)."""
    if state == "open":
        return SubjectPlan("keep", reason="the subject is live")
    if state == "dropped":
        return SubjectPlan("none")
    if pinned_until is None:
        return SubjectPlan("drop", "ephemeral_evidence",
                           "ephemeral_until_export: its session is gone")
    if pinned_until > now:
        return SubjectPlan("keep", reason=f"temporary_postmortem_pin until {rfc3339(pinned_until)}")
    return SubjectPlan("drop", "expired_postmortem_pin",
                       f"temporary_postmortem_pin expired at {rfc3339(pinned_until)}")


def summarize(row: dict[str, Any] | None, *, screenshot_count: int, screenshot_bytes: int,
              exported_bundle: BundleRef | None, now: dt.datetime,
              active_window_s: float) -> ReviewSummary:
    """The ReviewRecordingSummary of a subject row (``None``: never recorded)."""
    if row is None:
        return ReviewSummary(mode="unavailable", status="unavailable",
                             retention="ephemeral_until_export",
                             reason="nothing was recorded for this subject")
    pinned = row["pinned_until"]
    retention: Any = "temporary_postmortem_pin" if pinned is not None else "ephemeral_until_export"
    if row["state"] == "dropped":
        return ReviewSummary(mode="unavailable", status="unavailable", retention=retention,
                             exported_bundle=exported_bundle,
                             reason=row["drop_reason"] or "the evidence was deleted")
    last_seq = int(row["last_seq"])
    last = row["last_captured_at"]
    if row["exported_seq"] is not None and int(row["exported_seq"]) == last_seq:
        status: Any = "exported"
    elif row["state"] == "open" and last is not None \
            and (now - last).total_seconds() <= active_window_s:
        status = "active"
    else:
        status = "idle"
    return ReviewSummary(
        mode="sparse_timeline", status=status, retention=retention, event_count=last_seq,
        screenshot_count=screenshot_count,
        approx_bytes=int(row["entry_bytes"]) + screenshot_bytes + (512 if last_seq else 0),
        last_captured_at=rfc3339(last), exportable=last_seq > 0, exported_bundle=exported_bundle,
        postmortem_retained_until=rfc3339(pinned), reason=None)


# -- entries ------------------------------------------------------------------------------

MAX_TEXT = 160
"""Characters kept of a long string value in an entry's summary."""
MAX_ITEMS = 16


def compact(value: Any, depth: int = 0) -> Any:
    """``value`` with long strings cut (``…`` and the original length) and deep or long
    containers shortened, so a timeline entry stays well under 1 KB."""
    if isinstance(value, str):
        if len(value) <= MAX_TEXT:
            return value
        return f"{value[:MAX_TEXT]}… ({len(value)} chars)"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if depth >= 4:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k)[:64]: compact(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["…"] = f"{len(items) - MAX_ITEMS} more keys"
        return out
    if isinstance(value, (list, tuple)):
        head = [compact(v, depth + 1) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            head.append(f"… {len(value) - MAX_ITEMS} more")
        return head
    return value


def timeline_line(entry: dict[str, Any]) -> bytes:
    """One line of ``timeline.jsonl`` (``entry``: a row of ``entries``), newline included."""
    sha = entry["screenshot_sha256"]
    line = {
        "seq": int(entry["seq"]), "at": rfc3339(entry["at"]), "kind": entry["kind"],
        "actor": entry["actor"], "summary": entry["summary"],
        "screenshot": None if sha is None else {"sha256": sha, "file": f"screenshots/{sha}.png"},
    }
    return msgspec.json.encode(line) + b"\n"
