"""The readiness ladder of a desktop session, as a decision table (no I/O).

``booting → desktop_ready → bridge_listening → bridge_attached → runtime_ready | failed``

The provider runs the check of the next rung and hands what it saw to
:func:`plan`, which says where the session goes. One rung per call, so each
rung is reached, timestamped and recorded in order.

=====================  ==========================================  ==================
current                what the provider saw (:class:`Probe`)       next
=====================  ==========================================  ==================
runtime_ready, failed  anything                                     unchanged (final)
any other              ``fatal`` (the VM or sandbox died)           failed, the cause
any other              ``elapsed_s`` > ``timeout_s``                failed, "did not
                                                                    come up in N s"
booting                ``display`` (the X display answers)          desktop_ready
desktop_ready          ``listening`` (the bridge endpoint exists)   bridge_listening
bridge_listening       ``attached`` (the host connected to it)      bridge_attached
bridge_attached        ``healthy`` (a health round trip passed)     runtime_ready
otherwise                                                           unchanged (wait)
=====================  ==========================================  ==================

``bridge_status`` follows the rung (:func:`bridge_status_of`): ``viewer_only``
until a bridge listens (the display can be looked at, nothing acts on it),
``bridge_waiting`` while it is being attached and checked, then
``runtime_ready`` or ``failed``. ``runtime_ready`` never appears before the
health round trip passed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dovecote.bus.messages.desktops import BridgeStatus, ReadinessState

LADDER: tuple[ReadinessState, ...] = ("booting", "desktop_ready", "bridge_listening",
                                      "bridge_attached", "runtime_ready")
FINAL: frozenset[str] = frozenset({"runtime_ready", "failed"})


@dataclass(frozen=True, kw_only=True)
class Probe:
    """What the provider saw when it checked the next rung."""

    elapsed_s: float
    timeout_s: float
    display: bool = False
    listening: bool = False
    attached: bool = False
    healthy: bool = False
    fatal: str | None = None


@dataclass(frozen=True, kw_only=True)
class Step:
    state: ReadinessState
    bridge_status: BridgeStatus
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL


def bridge_status_of(state: ReadinessState) -> BridgeStatus:
    """The ``bridge_status`` shown with a readiness state."""
    if state in ("booting", "desktop_ready"):
        return "viewer_only"
    if state in ("bridge_listening", "bridge_attached"):
        return "bridge_waiting"
    return "runtime_ready" if state == "runtime_ready" else "failed"


def plan(current: ReadinessState, probe: Probe) -> Step:
    """The next step of the ladder from ``current`` given ``probe`` (see the table above)."""
    if current in FINAL:
        return Step(state=current, bridge_status=bridge_status_of(current))
    if probe.fatal:
        return Step(state="failed", bridge_status="failed", error=probe.fatal)
    if probe.elapsed_s > probe.timeout_s:
        return Step(state="failed", bridge_status="failed",
                    error=f"the guest bridge did not come up within {probe.timeout_s:g} s "
                          f"(stuck at {current})")
    passed = {"booting": probe.display, "desktop_ready": probe.listening,
              "bridge_listening": probe.attached, "bridge_attached": probe.healthy}[current]
    state = LADDER[LADDER.index(current) + 1] if passed else current
    return Step(state=state, bridge_status=bridge_status_of(state))
