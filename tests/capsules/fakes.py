"""A unit-test seam for vmmgr: a "VM" that is the REAL guest agent in a host process.

:class:`AgentProcessDriver` implements the driver interface by starting
``python -m dovecote.vmmgr.guest.agent --listen-unix <the capsule's agent socket>`` per capsule, so the
state machine, the caps, reconcile and every agent operation run for real
in milliseconds. It is never what the feature is shown working on: the VM
tests (``test_capsules_vm.py``) boot QEMU through the libvirt driver.
"""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from dovecote.vmmgr import guest
from dovecote.vmmgr.accel import Accel
from dovecote.vmmgr.driver import (
    Driver,
    VmExists,
    VmHandle,
    VmInfo,
    VmNotFound,
    VmSpec,
    VmState,
    VmStats,
)
from dovecote.vmmgr.images import GuestImage


def _spawn_agent(spec: VmSpec) -> subprocess.Popen[bytes]:
    etc = spec.overlay_path.parent / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    with open(spec.console_log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", guest.AGENT_MODULE, "--listen-unix", str(spec.agent_socket_path),
             "--no-system-changes", "--machine-id-path", str(etc / "machine-id"),
             "--hostname-path", str(etc / "hostname")],
            stdout=log, stderr=subprocess.STDOUT)


def fake_image(directory: Path) -> GuestImage:
    return GuestImage(directory=directory, image_id="fake", kernel=directory / "vmlinuz",
                      initrd=directory / "initrd.img", rootfs=directory / "rootfs.qcow2",
                      cmdline="console=ttyS0", kernel_version="6.1.0-fake")


class AgentProcessDriver(Driver):
    """Each "VM" is a guest agent process listening on the capsule's agent socket."""

    accel = Accel.TCG

    def __init__(self, *, fail_create: bool = False) -> None:
        self.procs: dict[str, tuple[subprocess.Popen[bytes], VmHandle]] = {}
        self.fail_create = fail_create
        self.fail_save = False
        self.fail_restore = False
        self.destroyed: list[str] = []
        self._saved: dict[Path, VmSpec] = {}
        self._specs: dict[str, VmSpec] = {}

    async def create(self, spec: VmSpec) -> VmHandle:
        if self.fail_create:
            from dovecote.vmmgr.driver import DriverError

            raise DriverError("the hypervisor said no")
        if spec.capsule_id in self.procs and self.procs[spec.capsule_id][0].poll() is None:
            raise VmExists(spec.capsule_id)
        proc = await trio.to_thread.run_sync(_spawn_agent, spec)
        handle = VmHandle(capsule_id=spec.capsule_id, name=f"dovecote-{spec.capsule_id}",
                          accel=self.accel, overlay_path=spec.overlay_path,
                          agent_socket_path=spec.agent_socket_path,
                          console_log_path=spec.console_log_path)
        self.procs[spec.capsule_id] = (proc, handle)
        self._specs[spec.capsule_id] = spec
        return handle

    def _proc(self, capsule_id: str) -> tuple[subprocess.Popen[bytes], VmHandle]:
        entry = self.procs.get(capsule_id)
        if entry is None or entry[0].poll() is not None:
            raise VmNotFound(capsule_id)
        return entry

    async def destroy(self, capsule_id: str, *, remove_disk: bool = True) -> None:
        proc, _ = self._proc(capsule_id)
        proc.kill()
        await trio.to_thread.run_sync(proc.wait)
        self.procs.pop(capsule_id, None)
        self.destroyed.append(capsule_id)

    async def state(self, capsule_id: str) -> VmState:
        self._proc(capsule_id)
        return VmState.RUNNING

    async def list(self) -> builtins.list[VmInfo]:
        return [VmInfo(handle=h, state=VmState.RUNNING) for p, h in self.procs.values()
                if p.poll() is None]

    async def agent_socket(self, capsule_id: str) -> Path:
        return self._proc(capsule_id)[1].agent_socket_path

    async def pause(self, capsule_id: str) -> None:
        raise NotImplementedError

    async def resume(self, capsule_id: str) -> None:
        raise NotImplementedError

    async def save(self, capsule_id: str, path: Path) -> None:
        """Stop the "VM" and remember how to start it again (its processes are lost)."""
        from dovecote.vmmgr.driver import DriverError

        proc, _ = self._proc(capsule_id)
        if self.fail_save:
            raise DriverError("save refused (fault injected)")
        proc.kill()
        await trio.to_thread.run_sync(proc.wait)
        self.procs.pop(capsule_id, None)
        await trio.Path(path).write_text(capsule_id)
        self._saved[path] = self._specs[capsule_id]

    async def restore(self, path: Path, *, memory_file: Path | None = None,
                      paused: bool = False) -> VmHandle:
        from dovecote.vmmgr.driver import DriverError

        if self.fail_restore:
            raise DriverError("restore refused (fault injected)")
        return await self.create(self._saved[path])

    async def stats(self, capsule_id: str) -> VmStats:
        """The agent process's CPU time and resident set (from /proc), the overlay's blocks."""
        proc, handle = self._proc(capsule_id)
        return await trio.to_thread.run_sync(_process_stats, proc.pid, handle.overlay_path)

    def kill_all(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def _process_stats(pid: int, overlay: Path) -> VmStats:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        raise VmNotFound(str(pid)) from None
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    try:
        disk = overlay.stat().st_blocks * 512
    except OSError:
        disk = 0
    return VmStats(cpu_time_ns=ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK"), vcpus=1,
                   memory_bytes=pages * os.sysconf("SC_PAGE_SIZE"), disk_bytes=disk)
