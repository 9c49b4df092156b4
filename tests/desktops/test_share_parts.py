"""The parts of a qemu session's host share that need no VM: the 9p device in the domain XML,
the ACL that lets QEMU's user into the shared directory, and the guest's setup script."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dovecote.services.desktops.qemu import guest_setup_script
from dovecote.vmmgr.accel import Accel
from dovecote.vmmgr.desktop import grant_access
from dovecote.vmmgr.domain_xml import SHARE_TAG, DomainConfig, build_domain_xml, share_dir_of

OTHER_UID = 54321


def config(tmp_path: Path, share: Path | None) -> DomainConfig:
    return DomainConfig(capsule_id="cap-share", accel=Accel.TCG, vcpus=1, memory_mib=256,
                        kernel=tmp_path / "k", initrd=tmp_path / "i", cmdline="console=ttyS0",
                        overlay_path=tmp_path / "d.qcow2", agent_socket_path=tmp_path / "a.sock",
                        console_log_path=tmp_path / "c.log", share_dir=share)


def test_the_share_is_a_mapped_9p_filesystem_found_back_in_the_live_xml(tmp_path: Path) -> None:
    xml = build_domain_xml(config(tmp_path, tmp_path / "share"))
    assert "<filesystem type=\"mount\" accessmode=\"mapped\">" in xml
    assert f"<target dir=\"{SHARE_TAG}\" />" in xml
    assert share_dir_of(xml) == tmp_path / "share"
    plain = build_domain_xml(config(tmp_path, None))
    assert "<filesystem" not in plain and share_dir_of(plain) is None


def as_other_user(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                           *argv], capture_output=True, text=True, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_grant_access_lets_one_more_user_write_and_keeps_the_rest() -> None:
    # Not under pytest's tmp_path: its parents are 0700 (in a VM the share is reached
    # through a bind mount, so its parents do not matter there).
    tmp_path = Path(tempfile.mkdtemp(prefix="dcshare-", dir="/tmp"))
    tmp_path.chmod(0o755)
    try:
        check_grant(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def check_grant(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    (shared / "old.txt").write_text("old\n")
    (shared / "old.txt").chmod(0o644)
    assert as_other_user("touch", str(shared / "denied")).returncode != 0
    grant_access(shared, OTHER_UID)
    grant_access(shared, OTHER_UID)  # twice: the same ACL
    made = as_other_user("sh", "-c", f"echo new > {shared}/new.txt && mkdir {shared}/d && "
                                     f"touch {shared}/d/f && cat {shared}/old.txt")
    assert made.returncode == 0 and made.stdout == "old\n", made.stderr
    assert shared.stat().st_mode & 0o7777 == 0o770  # the group bits show the ACL's mask
    assert as_other_user("touch", str(tmp_path / "outside")).returncode != 0


def test_the_guest_setup_runs_only_what_the_session_needs() -> None:
    assert guest_setup_script(user=None, home="/home/dove", runtime="/run/user/1000", share=False,
                              bare=False) == ""
    both = guest_setup_script(user=None, home="/home/dove", runtime="/run/user/1000", share=True,
                              bare=True)
    assert "mount -t 9p -o trans=virtio" in both and SHARE_TAG in both
    assert "chown dove: /shared/hostshare" in both and "pgrep -x openbox" in both
    other = guest_setup_script(user="ana", home="/home/ana", runtime="/tmp/r", share=True, bare=False)
    assert "useradd -m -d /home/ana" in other and "chown ana: /shared/hostshare" in other
    assert "openbox" not in other
