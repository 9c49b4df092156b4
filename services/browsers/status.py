"""The status machine of a browser session, as a table (no I/O).

::

    creating ──▶ running ──▶ completed   (idle timeout, the planner's ``done`` is not an end)
       │            ├──────▶ failed      (the browser or its VM died, a planner error)
       │            └──────▶ cancelled   (DELETE)
       ├──────────────────▶ failed      (could not provision, ``planner_unavailable``)
       └──────────────────▶ cancelled   (DELETE while creating)

Terminal statuses never change again. The store applies a change with one
guarded ``UPDATE ... WHERE status = <from>``, so two racing enders (a DELETE
and a dying VM) settle on whichever came first.
"""

from __future__ import annotations

from dovecote.bus.messages.browsers import TERMINAL, Status

TRANSITIONS: dict[str, frozenset[str]] = {
    "creating": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"completed", "failed", "cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


def allowed(current: str, target: str) -> bool:
    """Whether ``current → target`` is a transition of the table."""
    return target in TRANSITIONS.get(current, frozenset())


def is_terminal(status: str) -> bool:
    return status in TERMINAL


def end_status_of(reason: str) -> Status:
    """The terminal status an end reason leads to."""
    if reason in ("deleted", "shutdown"):
        return "cancelled"
    if reason == "idle_timeout":
        return "completed"
    return "failed"
