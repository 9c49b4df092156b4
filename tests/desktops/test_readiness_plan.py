"""The readiness ladder's decision table (services/desktops/readiness.py), row by row."""

from __future__ import annotations

import pytest

from dovecote.services.desktops.readiness import Probe, bridge_status_of, plan

T = 60.0


@pytest.mark.parametrize(("current", "probe", "state", "bridge", "error"), [
    ("runtime_ready", Probe(elapsed_s=999, timeout_s=T, fatal="x"), "runtime_ready", "runtime_ready", None),
    ("failed", Probe(elapsed_s=1, timeout_s=T, display=True), "failed", "failed", None),
    ("booting", Probe(elapsed_s=1, timeout_s=T, fatal="the sandbox exited"), "failed", "failed",
     "the sandbox exited"),
    ("bridge_attached", Probe(elapsed_s=61, timeout_s=T, healthy=True), "failed", "failed",
     "the guest bridge did not come up within 60 s (stuck at bridge_attached)"),
    ("booting", Probe(elapsed_s=1, timeout_s=T, display=True), "desktop_ready", "viewer_only", None),
    ("booting", Probe(elapsed_s=1, timeout_s=T, listening=True), "booting", "viewer_only", None),
    ("desktop_ready", Probe(elapsed_s=1, timeout_s=T, listening=True), "bridge_listening",
     "bridge_waiting", None),
    ("bridge_listening", Probe(elapsed_s=1, timeout_s=T, attached=True), "bridge_attached",
     "bridge_waiting", None),
    ("bridge_attached", Probe(elapsed_s=1, timeout_s=T, healthy=True), "runtime_ready", "runtime_ready",
     None),
    ("bridge_attached", Probe(elapsed_s=1, timeout_s=T, attached=True), "bridge_attached",
     "bridge_waiting", None),
])
def test_plan_table(current, probe, state, bridge, error) -> None:  # type: ignore[no-untyped-def]
    step = plan(current, probe)
    assert (step.state, step.bridge_status, step.error) == (state, bridge, error)


def test_runtime_ready_only_after_every_rung() -> None:
    state = "booting"
    seen = [state]
    for _ in range(4):
        state = plan(state, Probe(elapsed_s=0, timeout_s=T, display=True, listening=True,  # type: ignore[arg-type]
                                  attached=True, healthy=True)).state
        seen.append(state)
    assert seen == ["booting", "desktop_ready", "bridge_listening", "bridge_attached", "runtime_ready"]
    assert [bridge_status_of(s) for s in seen] == [  # type: ignore[arg-type]
        "viewer_only", "viewer_only", "bridge_waiting", "bridge_waiting", "runtime_ready"]
