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
