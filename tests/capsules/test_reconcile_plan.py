"""reconcile.plan: what vmmgr does at start with each VM and each record (no I/O)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dovecote.vmmgr.accel import Accel
from dovecote.vmmgr.driver import VmHandle, VmInfo, VmState
from dovecote.vmmgr.reconcile import plan


def vm(capsule_id: str, state: VmState = VmState.RUNNING) -> VmInfo:
    d = Path("/run") / capsule_id
    return VmInfo(state=state, handle=VmHandle(
        capsule_id=capsule_id, name=f"dovecote-{capsule_id}", accel=Accel.TCG,
        overlay_path=d / "disk.qcow2", agent_socket_path=d / "agent.sock",
        console_log_path=d / "console.log"))


def rec(status: str, host_id: str = "h1") -> dict[str, Any]:
    return {"status": status, "host_id": host_id}


def test_each_combination_of_vm_and_record_has_one_action() -> None:
    vms = [vm("run"), vm("boot"), vm("stop"), vm("orphan"), vm("dead-record"), vm("other"),
           vm("crashed", VmState.CRASHED)]
    records = {"run": rec("running"), "boot": rec("starting"), "stop": rec("stopping"),
               "dead-record": rec("stopped"), "other": rec("running", "h2"),
               "crashed": rec("running"), "gone": rec("running"), "gone-stopping": rec("stopping"),
               "gone-elsewhere": rec("running", "h2")}
    out = plan(vms, records, "h1")
    assert out.keep == ["run"]
    assert out.resume_boot == ["boot"]
    assert sorted(out.finish_destroy) == ["gone-stopping", "stop"]
    assert sorted(out.destroy_orphans) == ["crashed", "dead-record", "orphan"]
    assert sorted(out.mark_missing) == ["crashed", "gone"]
    assert out.foreign == ["other"]


def silent(status: str, host_id: str = "h1") -> dict[str, Any]:
    """A record whose host went quiet (``host_unreachable_since`` set)."""
    return {"status": status, "host_id": host_id, "host_unreachable_since": "2026-12-05T01:00:00Z"}


def test_a_host_back_from_silence_readopts_what_survived_and_destroys_only_final_records() -> None:
    table = [
        # (name, VM state or None, record, the list it lands in)
        ("lost-running", VmState.RUNNING, silent("missing"), "readopt"),
        ("lost-saved", None, silent("missing"), "readopt_saved"),
        ("lost-crashed", VmState.CRASHED, silent("missing"), "readopt_saved"),
        ("waiting", VmState.RUNNING, silent("running"), "keep"),
        ("user-destroyed", VmState.RUNNING, silent("stopped"), "destroy_orphans"),
        ("user-destroying", VmState.RUNNING, silent("stopping"), "finish_destroy"),
        ("vm-lost", VmState.RUNNING, rec("missing"), "destroy_orphans"),
        ("lost-elsewhere", VmState.RUNNING, silent("missing", "h2"), "foreign"),
    ]
    vms = [vm(name, state) for name, state, _, _ in table if state is not None]
    out = plan(vms, {name: record for name, _, record, _ in table}, "h1")
    for name, _, _, where in table:
        assert name in getattr(out, where), (name, where, out)
    # A readopted capsule is never also an orphan or missing.
    assert not set(out.readopt) & (set(out.destroy_orphans) | set(out.mark_missing))
    assert "lost-crashed" in out.destroy_orphans  # its dead VM goes; its saved state may remain
