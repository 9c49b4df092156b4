"""The QEMU confinement details of vmmgr's /healthz, from qemu.conf and /proc."""

from __future__ import annotations

import os
from pathlib import Path

from dovecote.vmmgr.confinement import health_details, seccomp_configured


def _proc(root: Path, pid: int, name: str, uid: int, seccomp: int) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "status").write_text(f"Name:\t{name}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nSeccomp:\t{seccomp}\n")


def test_seccomp_follows_qemu_conf_with_libvirts_default_on() -> None:
    assert seccomp_configured("#seccomp_sandbox = 1\n")
    assert seccomp_configured("seccomp_sandbox = 1\n")
    assert not seccomp_configured("user = 'x'\n  seccomp_sandbox = 0\n")


def test_health_reports_the_running_qemus_as_the_kernel_sees_them(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text("#seccomp_sandbox = 1\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    _proc(proc, 10, "qemu-system-x86", 64055, 2)
    _proc(proc, 11, "bash", 0, 0)
    me = os.getuid()
    details = health_details((me, me), conf, proc)
    assert details["qemu_seccomp"] == "on (1 running QEMU filtered)"
    assert f"(uid {me})" in details["qemu_user"] or me == 0

    _proc(proc, 12, "qemu-system-x86", 0, 0)  # unconfined: as root, no filter
    details = health_details((64055, 64055), conf, proc)
    assert details["qemu_seccomp"] == "off for running QEMU pid 12"
    assert "running as root: pid 12" in details["qemu_user"]

    conf.write_text("seccomp_sandbox = 0\n")
    assert health_details(None, conf, proc)["qemu_seccomp"].startswith("off (seccomp_sandbox = 0")
    assert health_details(None, conf, proc)["qemu_user"].startswith("root")
