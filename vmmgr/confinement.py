"""How QEMU is confined on this host, as ``/healthz`` shows it (``qemu_user``, ``qemu_seccomp``).

libvirt starts every capsule's QEMU as the user of its DAC base label (the
``user``/``group`` of ``/etc/libvirt/qemu.conf``; Debian's ``libvirt-qemu``)
and, unless ``seccomp_sandbox = 0`` there, with QEMU's seccomp sandbox
(``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,...``). Both
are libvirt's defaults; this module reports what this host really does: the
configuration, and the running QEMU processes as the kernel sees them
(``/proc/<pid>/status``: ``Uid`` and ``Seccomp: 2`` for a filter).
"""

from __future__ import annotations

import pwd
import re
from pathlib import Path

QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def qemu_user(owner: tuple[int, int] | None) -> str:
    """``name (uid N)`` of the user libvirt runs QEMU as, or ``root`` (not confined)."""
    if owner is None or owner[0] == 0:
        return "root (set user/group in /etc/libvirt/qemu.conf)"
    try:
        name = pwd.getpwuid(owner[0]).pw_name
    except KeyError:
        name = "?"
    return f"{name} (uid {owner[0]})"


def seccomp_configured(conf_text: str) -> bool:
    """Whether libvirt's ``seccomp_sandbox`` is on in a qemu.conf (its default is on)."""
    match = re.search(r"^\s*seccomp_sandbox\s*=\s*(-?\d+)", conf_text, re.MULTILINE)
    return match is None or int(match.group(1)) != 0


def running_qemus(proc: Path = Path("/proc")) -> list[tuple[int, int, int]]:
    """``(pid, uid, seccomp mode)`` of every running ``qemu-system-*`` process."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        name = re.search(r"^Name:\s*(\S+)", status, re.MULTILINE)
        if not name or not name.group(1).startswith("qemu-system"):
            continue
        uid = re.search(r"^Uid:\s*\d+\s+(\d+)", status, re.MULTILINE)  # the effective uid
        seccomp = re.search(r"^Seccomp:\s*(\d+)", status, re.MULTILINE)
        found.append((int(entry.name), int(uid.group(1)) if uid else -1,
                      int(seccomp.group(1)) if seccomp else 0))
    return found


def health_details(owner: tuple[int, int] | None, conf: Path = QEMU_CONF,
                   proc: Path = Path("/proc")) -> dict[str, str]:
    """The ``qemu_user`` and ``qemu_seccomp`` details of vmmgr's health."""
    try:
        configured = seccomp_configured(conf.read_text())
    except OSError:
        configured = True  # no qemu.conf: libvirt's defaults
    running = running_qemus(proc)
    unfiltered = [pid for pid, _, mode in running if mode != 2]
    as_root = [pid for pid, uid, _ in running if uid == 0]
    if not configured:
        seccomp = f"off (seccomp_sandbox = 0 in {conf})"
    elif unfiltered:
        seccomp = f"off for running QEMU pid {', '.join(map(str, unfiltered[:5]))}"
    else:
        seccomp = f"on ({len(running)} running QEMU filtered)" if running else "on"
    user = qemu_user(owner)
    if as_root:
        user += f"; running as root: pid {', '.join(map(str, as_root[:5]))}"
    return {"qemu_user": user, "qemu_seccomp": seccomp}
