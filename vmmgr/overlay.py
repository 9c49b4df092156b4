"""A capsule's copy-on-write disk: a qcow2 overlay over a read-only base (both drivers)."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import trio

from dovecote.vmmgr.driver import DriverError

if TYPE_CHECKING:
    from dovecote.vmmgr.driver import VmSpec


async def create_overlay(spec: VmSpec) -> None:
    """Create ``spec.overlay_path`` over ``spec.backing_disk`` (grown to ``disk_size_mib``
    when given) with ``qemu-img``.

    Raises:
        DriverError: qemu-img failed (its message).
    """
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
            "-b", str(spec.backing_disk.resolve()), str(spec.overlay_path)]  # fmt: skip
    if spec.disk_size_mib is not None:
        argv.append(f"{spec.disk_size_mib}M")
    result = await trio.run_process(
        argv, stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode != 0:
        raise DriverError(f"qemu-img create failed: {result.stderr.decode(errors='replace').strip()}")
