"""The task lease state machine, without I/O.

A run is claimed by one agent session at a time. ``claim-next`` itself is a
single SQL statement (``FOR UPDATE SKIP LOCKED``, in :mod:`.store`); every
later mutation of the lease is decided here, from the locked row, the calling
session and the time:

=================  ===========  ================  ============  ====================================
run status         last holder  lease_until       action        outcome
=================  ===========  ================  ============  ====================================
claimed            caller       in the future     heartbeat     ``claimed``, lease extended
claimed            caller       in the future     complete      ``completed`` (the run ends)
claimed            caller       in the future     fail          ``failed`` (the run ends)
claimed            caller       in the future     release       ``queued`` (holder cleared)
claimed            caller       passed            any           409 ``lease_expired``
queued / failed    caller       set (it expired   any           409 ``lease_expired``
                                and was swept)
anything else      anyone       any               any           409 ``lease_not_active``
=================  ===========  ================  ============  ====================================

The sweeper (:func:`plan_sweep`) ends leases whose ``lease_until`` passed:
the run goes back to ``queued`` with ``attempt + 1``, or, when that attempt
was the last of ``max_attempts``, to ``failed`` with ``failure_kind``
``lease_expired``. A swept run keeps its last holder and ``lease_until`` so
that holder's next call is told "lease expired" rather than "not active".

Fencing: the row is locked while deciding and the update is conditioned on
the ``claim_token_hash`` read, so a lease taken over after expiry (a new
claim, a new token) is never changed on behalf of its previous holder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dovecote.services.agents.errors import LeaseConflict, Unprocessable

Action = Literal["heartbeat", "complete", "fail", "release"]
Outcome = Literal["claimed", "completed", "failed", "queued"]

OUTCOMES: dict[str, Outcome] = {
    "heartbeat": "claimed",
    "complete": "completed",
    "fail": "failed",
    "release": "queued",
}

LEASE_EXPIRED = "lease_expired"
LEASE_NOT_ACTIVE = "lease_not_active"


@dataclass(frozen=True, kw_only=True)
class LeaseView:
    """What the decision needs of a run row (times in Unix seconds)."""

    status: str
    session_id: str | None
    lease_until: float | None
    failure_kind: str | None = None


def decide(run: LeaseView, caller: str, action: Action, now: float) -> Outcome:
    """The run's new lease status for ``action`` by session ``caller``, or raise LeaseConflict."""
    holder = run.session_id == caller
    if run.status == "claimed" and holder:
        if run.lease_until is not None and run.lease_until > now:
            return OUTCOMES[action]
        raise LeaseConflict("lease expired", code=LEASE_EXPIRED)
    swept = run.status == "queued" or (run.status == "failed" and run.failure_kind == LEASE_EXPIRED)
    if holder and swept and run.lease_until is not None:
        raise LeaseConflict("lease expired", code=LEASE_EXPIRED)
    raise LeaseConflict("not an active lease", code=LEASE_NOT_ACTIVE, details={"status": run.status})


def lease_seconds(requested: float | None, *, default: float, maximum: float) -> float:
    """The lease length to grant: ``default`` when not asked, 422 outside ``(0, maximum]``."""
    if requested is None:
        return min(default, maximum)
    if not 0 < requested <= maximum:
        raise Unprocessable(
            f"lease_seconds must be in (0, {maximum:g}]",
            code="lease_seconds_out_of_range",
            details={"lease_seconds": requested, "maximum": maximum},
        )
    return float(requested)


@dataclass(frozen=True, kw_only=True)
class SweepRow:
    id: str
    status: str
    lease_until: float | None
    attempt: int
    max_attempts: int


@dataclass(kw_only=True)
class SweepPlan:
    """Run ids to requeue (``attempt + 1``) and to fail (attempts used up)."""

    requeue: list[str] = field(default_factory=list)
    fail: list[str] = field(default_factory=list)


def plan_sweep(rows: list[SweepRow], now: float) -> SweepPlan:
    """Decide the fate of claimed runs whose lease ended.

    ==============================  ==========================
    claimed run                     plan
    ==============================  ==========================
    lease_until in the future       left alone
    lease passed, attempt < max     requeue (attempt + 1)
    lease passed, attempt >= max    fail (``lease_expired``)
    not claimed                     left alone
    ==============================  ==========================
    """
    plan = SweepPlan()
    for row in rows:
        if row.status != "claimed" or row.lease_until is None or row.lease_until > now:
            continue
        (plan.requeue if row.attempt < row.max_attempts else plan.fail).append(row.id)
    return plan
