"""mapped.decide: what settling does with a VM a dead vmmgr left mid-pause or mid-resume (no I/O)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dovecote.vmmgr.mapped import Action, decide, is_mapped_image


@pytest.mark.parametrize(("vm", "vcpus_running", "image_complete", "action"), [
    (False, False, True, Action.NOTHING),      # paused: reconcile finds memory.sav
    (False, False, False, Action.NOTHING),     # nothing to settle (reconcile: missing)
    (True, False, True, Action.DESTROY_VM),    # pause past its commit / resume before no return
    (True, False, False, Action.RUN_VCPUS),    # pause before its commit / resume past no return
    (True, True, True, Action.DROP_IMAGE),     # the vCPUs ran: the image is stale
    (True, True, False, Action.NOTHING),       # running
])
def test_each_row_of_the_table(vm: bool, vcpus_running: bool, image_complete: bool, action: Action) -> None:
    assert decide(vm=vm, vcpus_running=vcpus_running, image_complete=image_complete) is action


def test_a_libvirt_save_image_is_not_a_mapped_image(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"LibvirtQemudSave" + bytes(64))
    (tmp_path / "new").write_bytes(b"QEVM\x00\x00\x00\x03")
    assert not is_mapped_image(tmp_path / "old")
    assert is_mapped_image(tmp_path / "new")
    assert not is_mapped_image(tmp_path / "missing")
