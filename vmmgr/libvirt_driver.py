"""The libvirt/QEMU driver: capsule VMs as transient libvirt domains.

libvirt-python is blocking, so every call runs in a worker thread through
:func:`trio.to_thread.run_sync`, bounded by one :class:`trio.CapacityLimiter`
per driver (a libvirt connection is safe to share between threads). Calls are
never abandoned on cancellation: a half-done ``createXML`` must finish so that
we know whether the domain exists.

Domains are transient (``createXML``): when a VM stops, libvirt forgets it, and
the capsule's state of record is vmmgr's database. Running domains survive a
restart of vmmgr (and of libvirtd); :meth:`LibvirtDriver.list` finds them by name
(``dovecote-<capsule id>``) and by Dovecote's ``<metadata>`` element, which also
carries the paths of the capsule's files. The domain XML itself is built by
:mod:`dovecote.vmmgr.domain_xml` without I/O.

Files: the capsule's overlay is created here with ``qemu-img create -f qcow2 -b
BASE -F qcow2``. libvirt runs QEMU as an unprivileged user and relabels the
files of a domain on start, but the directories on the way to them must be
searchable by that user (mode 0755 or 0711), as must the guest image's.
"""

from __future__ import annotations

import builtins
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu
import trio

from dovecote.libs.logs import get_logger

from .accel import Accel
from .domain_xml import (
    METADATA_NS,
    SHARE_MOUNT_POINT,
    DomainConfig,
    Metadata,
    build_domain_xml,
    capsule_id_of,
    domain_name,
    emulator_env_of,
    parse_metadata,
    set_emulator_env,
    share_dir_of,
    valid_capsule_id,
    vnc_socket_of,
)
from .driver import (
    Driver,
    DriverError,
    DriverUnavailable,
    VmExists,
    VmHandle,
    VmInfo,
    VmNotFound,
    VmSpec,
    VmState,
    VmStats,
)
from .mapped import IMAGE_FILE, IMAGE_TMP, LOCK_FILE, RAM_FILE, XML_FILE, Action, decide, kill_point
from .overlay import create_overlay

log = get_logger("dovecote.vmmgr.libvirt_driver")

T = TypeVar("T")

DEFAULT_URI = "qemu:///system"

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: VmState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: VmState.STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: VmState.CRASHED,
}

_UNAVAILABLE = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
}


def _silence_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_silence_libvirt, None)


def _translate(exc: libvirt.libvirtError, capsule_id: str | None = None) -> DriverError:
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return VmNotFound(f"no VM for capsule {capsule_id}" if capsule_id else message)
    if code == libvirt.VIR_ERR_OPERATION_INVALID and capsule_id and "already exists" in message:
        return VmExists(f"capsule {capsule_id} already has a VM: {message}")
    if code in _UNAVAILABLE:
        return DriverUnavailable(message)
    return DriverError(message)


def _handle(meta: Metadata) -> VmHandle:
    return VmHandle(
        capsule_id=meta.capsule_id,
        name=domain_name(meta.capsule_id),
        accel=meta.accel,
        overlay_path=meta.overlay_path,
        agent_socket_path=meta.agent_socket_path,
        console_log_path=meta.console_log_path,
    )


def _metadata_of(dom: libvirt.virDomain) -> Metadata | None:
    """Dovecote's metadata of a domain (blocking), ``None`` if the domain is not ours."""
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise
    meta = parse_metadata(xml)
    if meta is None or domain_name(meta.capsule_id) != dom.name():
        return None
    return meta


def _state_of(dom: libvirt.virDomain) -> VmState:
    state, _reason = dom.state(0)
    return _STATES.get(state, VmState.OTHER)


class LibvirtDriver(Driver):
    """Capsule VMs on one libvirt connection (see :func:`open_libvirt_driver`)."""

    def __init__(self, conn: libvirt.virConnect, *, accel: Accel, limiter: trio.CapacityLimiter,
                 emulator: Path | None = None, own_ram: bool = True) -> None:
        self._conn = conn
        self.accel = accel
        self._limiter = limiter
        self.emulator = emulator
        """Dovecote's QEMU wrapper (:mod:`dovecote.vmmgr.emulator`); without it no templating."""
        self.qemu_owner: tuple[int, int] | None = None
        """uid and gid QEMU runs as (libvirt's DAC base label), owner of the RAM files."""
        self.supports_prestart = emulator is not None
        """QEMU pre-started waiting for a template's state needs the wrapper (``-incoming defer``)."""
        self.own_ram = own_ram and emulator is not None
        """Each capsule's RAM in ``<capsule dir>/memory.ram`` (:mod:`dovecote.vmmgr.mapped`)."""
        self.timings: dict[str, float] = {}
        """Seconds of each step of the last create, mapped pause and mapped resume (benchmarks)."""

    # -- plumbing ----------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, capsule_id: str | None = None) -> T:
        try:
            return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)
        except libvirt.libvirtError as exc:
            raise _translate(exc, capsule_id) from exc

    async def _domain(self, capsule_id: str) -> libvirt.virDomain:
        if not valid_capsule_id(capsule_id):
            raise VmNotFound(f"no VM for capsule {capsule_id!r}")
        return await self._run(self._conn.lookupByName, domain_name(capsule_id), capsule_id=capsule_id)

    async def _ours(self, capsule_id: str) -> tuple[libvirt.virDomain, Metadata]:
        dom = await self._domain(capsule_id)
        meta = await self._run(_metadata_of, dom, capsule_id=capsule_id)
        if meta is None:
            raise VmNotFound(f"domain {domain_name(capsule_id)} exists but is not a Dovecote VM")
        return dom, meta

    async def _exists(self, capsule_id: str) -> bool:
        try:
            await self._domain(capsule_id)
        except VmNotFound:
            return False
        return True

    # -- the interface -----------------------------------------------------

    def _domain_config(self, spec: VmSpec) -> DomainConfig:
        templating = spec.memory_file is not None or spec.incoming_state is not None
        if templating and self.emulator is None:
            raise DriverError("VM templating needs Dovecote's QEMU wrapper (no emulator configured)")
        return DomainConfig(
            capsule_id=spec.capsule_id,
            accel=self.accel,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            kernel=spec.image.kernel,
            initrd=spec.image.initrd,
            cmdline=spec.image.cmdline,
            overlay_path=spec.overlay_path,
            agent_socket_path=spec.agent_socket_path,
            console_log_path=spec.console_log_path,
            emulator=self.emulator if templating else None,
            memory_file=spec.memory_file,
            memory_shared=spec.memory_shared,
            incoming=spec.incoming_state is not None,
            video=spec.image.video,
            share_dir=spec.share_dir,
        )

    async def prestart(self, spec: VmSpec) -> VmHandle:
        """QEMU started paused with ``-incoming defer``, the overlay made (see the base class)."""
        if spec.incoming_state is None:
            raise DriverError("only a template's restore can be pre-started")
        return await self.create(spec, load_state=False)

    async def finish_restore(self, capsule_id: str, state: Path) -> None:
        """Device state in (``x-ignore-shared``: the RAM stays the template's file), vCPUs on."""
        dom = await self._domain(capsule_id)
        mark = began = time.perf_counter()
        try:
            await self._load_state(dom, capsule_id, state)
            self.timings["claim.load_state"], mark = time.perf_counter() - mark, time.perf_counter()
            await self._run(dom.resume, capsule_id=capsule_id)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._destroy_quietly(capsule_id)
            raise
        self.timings["claim.resume"] = time.perf_counter() - mark
        restore_ms = round((time.perf_counter() - began) * 1000, 1)
        log.info("pre-started VM restored", extra={"capsule_id": capsule_id, "restore_ms": restore_ms})

    async def create(self, spec: VmSpec, *, load_state: bool = True) -> VmHandle:
        if not valid_capsule_id(spec.capsule_id):
            raise DriverError(f"invalid capsule id {spec.capsule_id!r}")
        try:
            xml = build_domain_xml(self._domain_config(spec))
        except ValueError as exc:
            raise DriverError(str(exc)) from exc
        if await self._exists(spec.capsule_id):
            raise VmExists(f"capsule {spec.capsule_id} already has a VM")
        timings: dict[str, float] = {}  # this call's own (another VM's may run meanwhile)
        mark = time.perf_counter()
        created_overlay = not spec.overlay_path.exists()
        if created_overlay:
            await create_overlay(spec)
        timings["create.overlay"], mark = time.perf_counter() - mark, time.perf_counter()
        spec.agent_socket_path.unlink(missing_ok=True)  # a stale socket of an earlier VM
        own_ram: Path | None = None
        if self.own_ram and spec.memory_file is None:
            # A cold boot: the capsule's RAM in an empty sparse file of its own, mapped
            # shared. A VM restored from a template maps the template's file
            # copy-on-write (a copy of it would cost 0.15-1 s here); its first pause is
            # libvirt's save, and its resume moves the RAM into a file of its own.
            own_ram = spec.overlay_path.parent / RAM_FILE
            await trio.to_thread.run_sync(self._prepare_memory_file, own_ram)
            spec = replace(spec, memory_file=own_ram, memory_shared=True)
            xml = build_domain_xml(self._domain_config(spec))
        elif spec.memory_file is not None and spec.memory_shared:
            await trio.to_thread.run_sync(self._prepare_memory_file, spec.memory_file)
        if spec.share_dir is not None:
            await trio.to_thread.run_sync(self._prepare_share_dir, spec.share_dir)
        timings["create.ram_file"], mark = time.perf_counter() - mark, time.perf_counter()
        flags = libvirt.VIR_DOMAIN_START_PAUSED if spec.incoming_state is not None else 0
        try:
            dom = await self._run(self._conn.createXML, xml, flags, capsule_id=spec.capsule_id)
            timings["create.createXML"], mark = time.perf_counter() - mark, time.perf_counter()
            if spec.incoming_state is not None and load_state:
                await self._load_state(dom, spec.capsule_id, spec.incoming_state)
                timings["create.load_state"], mark = time.perf_counter() - mark, time.perf_counter()
                if not spec.start_paused:
                    await self._run(dom.resume, capsule_id=spec.capsule_id)
                timings["create.resume"] = time.perf_counter() - mark
        except BaseException:
            with trio.CancelScope(shield=True):
                if spec.incoming_state is not None:
                    await self._destroy_quietly(spec.capsule_id)
                if created_overlay:
                    spec.overlay_path.unlink(missing_ok=True)
                if own_ram is not None:
                    own_ram.unlink(missing_ok=True)
            raise
        self.timings.update(timings)
        log.info("VM started", extra={"capsule_id": spec.capsule_id, "accel": str(self.accel),
                                      "restored": spec.incoming_state is not None,
                                      "waiting_for_state": not load_state})
        return VmHandle(
            capsule_id=spec.capsule_id,
            name=domain_name(spec.capsule_id),
            accel=self.accel,
            overlay_path=spec.overlay_path,
            agent_socket_path=spec.agent_socket_path,
            console_log_path=spec.console_log_path,
        )

    async def _destroy_quietly(self, capsule_id: str) -> None:
        try:
            dom = await self._domain(capsule_id)
            await self._run(dom.destroy, capsule_id=capsule_id)
        except DriverError:
            pass

    def _prepare_memory_file(self, path: Path) -> None:
        """An empty RAM file QEMU (an unprivileged user, see :func:`_qemu_owner`) may write, 0600."""
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            if self.qemu_owner is not None and os.geteuid() == 0:
                os.fchown(fd, *self.qemu_owner)
        finally:
            os.close(fd)

    def _prepare_share_dir(self, path: Path) -> None:
        """The 9p export of a VM and its empty ``hostshare`` mount point, owned by QEMU's user."""
        for directory in (path, path / SHARE_MOUNT_POINT):
            directory.mkdir(mode=0o755, exist_ok=True)
            if self.qemu_owner is not None and os.geteuid() == 0:
                os.chown(directory, *self.qemu_owner)

    async def share_into(self, capsule_id: str, host_dir: Path) -> None:
        """Bind ``host_dir`` on the share's ``hostshare`` inside QEMU's own mount namespace.

        QEMU opened its 9p export when it started, so the directory is put *inside* it:
        a bind mount made with ``nsenter`` in the namespace libvirt gave that QEMU (never
        in vmmgr's: the capsule's directory is removed with ``rmtree`` at destroy, which
        must not walk into the host's directory). It goes away with the QEMU process.
        """
        dom, _meta = await self._ours(capsule_id)
        xml = await self._run(dom.XMLDesc, 0, capsule_id=capsule_id)
        share = share_dir_of(xml)
        if share is None:
            raise DriverError(f"capsule {capsule_id}: its VM has no 9p share")
        pid_file = Path("/run/libvirt/qemu") / f"{domain_name(capsule_id)}.pid"
        try:
            pid = int(pid_file.read_text().strip())
            theirs = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            ours = os.stat("/proc/self/ns/mnt").st_ino
        except (OSError, ValueError) as exc:
            raise DriverError(f"capsule {capsule_id}: QEMU's process is not found ({exc})") from exc
        if theirs == ours:
            raise DriverError("QEMU runs in vmmgr's own mount namespace (libvirt's qemu.conf "
                              "namespaces is empty): host directories are not shared")
        target = share / SHARE_MOUNT_POINT
        with trio.fail_after(30):
            result = await trio.run_process(
                ["nsenter", f"--target={pid}", "--mount", "--", "mount", "--bind", "--",
                 str(host_dir), str(target)],
                capture_stdout=True, capture_stderr=True, check=False)
        if result.returncode != 0:
            raise DriverError(f"capsule {capsule_id}: the bind mount of {host_dir} failed: "
                              f"{result.stderr.decode(errors='replace').strip()[:300]}")
        log.info("host directory shared", extra={"capsule_id": capsule_id, "host_dir": str(host_dir)})

    # -- QMP (through libvirt's monitor passthrough) ---------------------------

    def _qmp_sync(self, dom: libvirt.virDomain, command: str, files: builtins.list[int] | None = None,
                  **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        text = json.dumps(message)
        if files:
            reply = libvirt_qemu.qemuMonitorCommandWithFiles(dom, text, files, 0)[0]
        else:
            reply = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
        answer = json.loads(reply)
        if "error" in answer:
            raise DriverError(f"QMP {command}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return")

    async def _qmp(self, dom: libvirt.virDomain, command: str, capsule_id: str,
                   files: builtins.list[int] | None = None, **arguments: Any) -> Any:
        return await self._run(functools.partial(self._qmp_sync, dom, command, files, **arguments),
                               capsule_id=capsule_id)

    async def _load_state(self, dom: libvirt.virDomain, capsule_id: str, state: Path) -> None:
        """Feed a template's device state to a VM started with ``-incoming defer``."""
        await self._qmp(dom, "migrate-set-capabilities", capsule_id,
                        capabilities=[{"capability": "x-ignore-shared", "state": True}])
        read_end, write_end = os.pipe()
        try:
            await self._qmp(dom, "getfd", capsule_id, files=[read_end], fdname="dovecote-in")
        finally:
            os.close(read_end)
        try:
            await self._qmp(dom, "migrate-incoming", capsule_id, uri="fd:dovecote-in")
            await trio.to_thread.run_sync(_copy_file_to_fd, state, write_end, limiter=self._limiter)
        finally:
            os.close(write_end)
        await self._wait_migration(dom, capsule_id, incoming=True)
        # The capability is recorded in every later save stream (pause): off again,
        # so that a plain restore (whole RAM from the file) accepts it.
        await self._qmp(dom, "migrate-set-capabilities", capsule_id,
                        capabilities=[{"capability": "x-ignore-shared", "state": False}])

    async def _wait_migration(self, dom: libvirt.virDomain, capsule_id: str, *, incoming: bool,
                              timeout_s: float = 120.0) -> None:
        with trio.move_on_after(timeout_s) as scope:
            while True:
                if incoming:
                    status = (await self._qmp(dom, "query-status", capsule_id))["status"]
                    if status != "inmigrate":
                        if status not in ("paused", "running", "prelaunch"):
                            raise DriverError(f"restoring the device state failed (VM {status})")
                        return
                else:
                    info = await self._qmp(dom, "query-migrate", capsule_id)
                    status = info.get("status")
                    if status == "completed":
                        return
                    if status in ("failed", "cancelled"):
                        raise DriverError(f"saving the device state failed: {info.get('error-desc', status)}")
                await trio.sleep(0.002)
        if scope.cancelled_caught:
            raise DriverError(f"capsule {capsule_id}: migration did not finish within {timeout_s:g} s")

    async def freeze(self, capsule_id: str, state_path: Path) -> None:
        dom, _meta = await self._ours(capsule_id)
        if await self._run(_state_of, dom, capsule_id=capsule_id) is VmState.RUNNING:
            await self._run(dom.suspend, capsule_id=capsule_id)
        began = time.monotonic()
        await self._write_state(dom, capsule_id, state_path)
        log.info("VM frozen", extra={"capsule_id": capsule_id, "state": str(state_path),
                                     "freeze_s": round(time.monotonic() - began, 3)})

    # -- pause and resume through the RAM file (dovecote.vmmgr.mapped) --------------

    async def ram_file(self, capsule_id: str) -> Path | None:
        """The file the VM's RAM is mapped shared from, if any."""
        dom, _meta = await self._ours(capsule_id)
        return _shared_ram(await self._run(dom.XMLDesc, 0, capsule_id=capsule_id))

    async def _write_state(self, dom: libvirt.virDomain, capsule_id: str, target: Path) -> None:
        """The device state only (``x-ignore-shared``) of a stopped VM into ``target``."""
        await self._qmp(dom, "migrate-set-capabilities", capsule_id,
                        capabilities=[{"capability": "x-ignore-shared", "state": True}])
        read_end, write_end = os.pipe()
        try:
            try:
                await self._qmp(dom, "getfd", capsule_id, files=[write_end], fdname="dovecote-out")
            finally:
                os.close(write_end)
            await self._qmp(dom, "migrate", capsule_id, uri="fd:dovecote-out")
            await trio.to_thread.run_sync(_copy_fd_to_file, read_end, target, limiter=self._limiter)
        finally:
            os.close(read_end)
        await self._wait_migration(dom, capsule_id, incoming=False)

    async def _ignore_shared_off(self, dom: libvirt.virDomain, capsule_id: str) -> None:
        await self._qmp(dom, "migrate-set-capabilities", capsule_id,
                        capabilities=[{"capability": "x-ignore-shared", "state": False}])

    async def save_mapped(self, capsule_id: str, directory: Path, *, release: bool = True) -> None:
        """Pause a VM whose RAM is ``directory/memory.ram`` (see :mod:`dovecote.vmmgr.mapped`).

        On failure before the commit the VM runs on; after it, the image is complete.
        ``release``: destroy the VM before returning; else the caller calls
        :meth:`release_paused` (the capsule is paused from the commit on).
        """
        dom, meta = await self._ours(capsule_id)
        image, tmp = directory / IMAGE_FILE, directory / IMAGE_TMP
        timings: dict[str, float] = {}  # this call's own (another VM's may run meanwhile)
        mark = began = time.perf_counter()
        was_running = await self._run(_state_of, dom, capsule_id=capsule_id) is VmState.RUNNING
        if was_running:
            await self._run(dom.suspend, capsule_id=capsule_id)
        timings["pause.suspend"], mark = time.perf_counter() - mark, time.perf_counter()
        kill_point("pause.suspended")
        try:
            await self._write_state(dom, capsule_id, tmp)
            flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE
            xml = await self._run(dom.XMLDesc, flags, capsule_id=capsule_id)
            await trio.to_thread.run_sync(_write_durably, directory / XML_FILE, xml.encode())
            timings["pause.device_state"], mark = time.perf_counter() - mark, time.perf_counter()
            kill_point("pause.state_written")
            await trio.to_thread.run_sync(_fsync_path, directory / RAM_FILE, limiter=self._limiter)
            await trio.to_thread.run_sync(_fsync_path, tmp)
            timings["pause.flush_ram"], mark = time.perf_counter() - mark, time.perf_counter()
            kill_point("pause.flushed")
            await trio.to_thread.run_sync(_commit, tmp, image)
        except BaseException:
            with trio.CancelScope(shield=True):
                tmp.unlink(missing_ok=True)
                await self._run_again(dom, capsule_id, was_running)
            raise
        timings["pause.commit"] = time.perf_counter() - mark
        timings["pause.total"] = time.perf_counter() - began
        timings.pop("pause.release_vm", None)
        self.timings.update(timings)
        kill_point("pause.committed")
        log.info("capsule %s: paused through its RAM file in %.3f s", capsule_id, timings["pause.total"],
                 extra={"capsule_id": capsule_id, "steps_ms": _steps_ms(timings, "pause.")})
        if release:
            await self._release(dom, meta)

    async def release_paused(self, capsule_id: str) -> None:
        """Destroy the VM of a committed mapped pause (errors logged: the image is whole, and
        the next resume or start destroys a paused VM left behind)."""
        try:
            dom, meta = await self._ours(capsule_id)
        except VmNotFound:
            return
        await self._release(dom, meta)

    async def _release(self, dom: libvirt.virDomain, meta: Metadata) -> None:
        # libvirt's destroy polls for QEMU's exit every 200 ms: ~210 ms here.
        mark = time.perf_counter()
        try:
            await self._run(dom.destroy, capsule_id=meta.capsule_id)
        except DriverError as exc:
            log.warning("capsule %s: could not release its paused VM: %s", meta.capsule_id, exc)
        meta.agent_socket_path.unlink(missing_ok=True)
        self.timings["pause.release_vm"] = time.perf_counter() - mark
        kill_point("pause.destroyed")

    async def _run_again(self, dom: libvirt.virDomain, capsule_id: str, was_running: bool) -> None:
        """After a pause that did not happen: capability off, vCPUs running again (errors logged)."""
        try:
            await self._ignore_shared_off(dom, capsule_id)
        except DriverError as exc:
            log.warning("capsule %s: x-ignore-shared stays on: %s", capsule_id, exc)
        if was_running:
            try:
                await self._run(dom.resume, capsule_id=capsule_id)
            except DriverError as exc:
                log.warning("capsule %s: could not run the VM again: %s", capsule_id, exc)

    async def restore_mapped(self, directory: Path) -> VmHandle:
        """Resume a VM paused by :meth:`save_mapped` from ``directory`` (its RAM file mapped again).

        On failure before the point of no return the image is intact and no VM is left.
        """
        xml = await trio.to_thread.run_sync((directory / XML_FILE).read_text)
        meta = parse_metadata(xml)
        if meta is None:
            raise DriverError(f"{directory / XML_FILE}: not a paused Dovecote VM")
        capsule_id = meta.capsule_id
        timings: dict[str, float] = {}  # this call's own (another VM's may run meanwhile)
        mark = began = time.perf_counter()
        if await self._exists(capsule_id):
            # A paused VM left by a pause whose release did not happen: the image is whole
            # and no vCPU ran since (the table's "destroy the VM" row); anything else is refused.
            if await self._settle_one(capsule_id, directory, locked=True) is not Action.DESTROY_VM:
                raise VmExists(f"capsule {capsule_id} already has a VM")
        if self.emulator is None:
            raise DriverError("resuming through the RAM file needs Dovecote's QEMU wrapper")
        env = {"DOVECOTE_MEM_PATH": str(directory / RAM_FILE), "DOVECOTE_MEM_SHARE": "true",
               "DOVECOTE_INCOMING": "defer"}
        dxml = set_emulator_env(xml, env, self.emulator)
        meta.agent_socket_path.unlink(missing_ok=True)
        dom = await self._run(self._conn.createXML, dxml, libvirt.VIR_DOMAIN_START_PAUSED,
                              capsule_id=capsule_id)
        timings["resume.createXML"], mark = time.perf_counter() - mark, time.perf_counter()
        kill_point("resume.started")
        try:
            await self._load_state(dom, capsule_id, directory / IMAGE_FILE)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._destroy_quietly(capsule_id)
            raise
        timings["resume.load_state"], mark = time.perf_counter() - mark, time.perf_counter()
        kill_point("resume.state_loaded")
        # The point of no return: the image is spent before a vCPU writes to the RAM file.
        await trio.to_thread.run_sync(_uncommit, directory / IMAGE_FILE)
        kill_point("resume.image_spent")
        await self._run(dom.resume, capsule_id=capsule_id)
        timings["resume.run"] = time.perf_counter() - mark
        timings["resume.total"] = time.perf_counter() - began
        self.timings.update(timings)
        kill_point("resume.running")
        log.info("capsule %s: resumed through its RAM file in %.3f s", capsule_id, timings["resume.total"],
                 extra={"capsule_id": capsule_id, "steps_ms": _steps_ms(timings, "resume.")})
        return _handle(meta)

    async def settle(self) -> builtins.list[tuple[str, Action]]:
        """Settle mapped pauses and resumes a dead process left half done (see
        :mod:`dovecote.vmmgr.mapped`'s table); returns what was done. Errors are logged."""
        done: builtins.list[tuple[str, Action]] = []
        for info in await self.list():
            capsule_id = info.handle.capsule_id
            try:
                ram = await self.ram_file(capsule_id)
                if ram is None or ram.name != RAM_FILE or not ram.parent.is_dir():
                    continue
                action = await self._settle_one(capsule_id, ram.parent)
            except (DriverError, OSError) as exc:
                log.warning("capsule %s: could not settle its VM: %s", capsule_id, exc)
                continue
            if action is not Action.NOTHING:
                log.warning("capsule %s: settled an interrupted pause or resume: %s", capsule_id, action)
                done.append((capsule_id, action))
        return done

    async def _settle_one(self, capsule_id: str, directory: Path, *, locked: bool = False) -> Action:
        """Apply the table to one VM; ``locked``: the caller holds the capsule's lock already."""
        from .filelock import try_lock
        from .mapped import is_mapped_image

        fd = None
        if not locked:
            fd = await trio.to_thread.run_sync(try_lock, directory / LOCK_FILE)
            if fd is None:
                return Action.NOTHING  # a live process pauses or resumes it right now
        try:
            dom, _meta = await self._ours(capsule_id)
            state = await self._run(_state_of, dom, capsule_id=capsule_id)
            if state not in (VmState.RUNNING, VmState.PAUSED):
                return Action.NOTHING
            complete = await trio.to_thread.run_sync(is_mapped_image, directory / IMAGE_FILE)
            action = decide(vm=True, vcpus_running=state is VmState.RUNNING, image_complete=complete)
            (directory / IMAGE_TMP).unlink(missing_ok=True)
            if action is Action.DESTROY_VM:
                await self._run(dom.destroy, capsule_id=capsule_id)
            elif action is Action.RUN_VCPUS:
                await self._run_again(dom, capsule_id, True)
            elif action is Action.DROP_IMAGE:
                await trio.to_thread.run_sync(_uncommit, directory / IMAGE_FILE)
            return action
        finally:
            if fd is not None:
                os.close(fd)

    async def destroy(self, capsule_id: str, *, remove_disk: bool = True) -> None:
        dom, meta = await self._ours(capsule_id)
        try:
            await self._run(dom.destroy, capsule_id=capsule_id)
        except VmNotFound:
            pass  # it stopped on its own meanwhile
        except DriverError:
            if await self._exists(capsule_id):
                raise
        meta.agent_socket_path.unlink(missing_ok=True)
        if remove_disk:
            meta.overlay_path.unlink(missing_ok=True)
            (meta.overlay_path.parent / RAM_FILE).unlink(missing_ok=True)
        log.info("VM destroyed", extra={"capsule_id": capsule_id})

    async def state(self, capsule_id: str) -> VmState:
        dom, _meta = await self._ours(capsule_id)
        return await self._run(_state_of, dom, capsule_id=capsule_id)

    async def list(self) -> builtins.list[VmInfo]:
        def list_sync() -> builtins.list[VmInfo]:
            found = []
            for dom in self._conn.listAllDomains(0):
                if capsule_id_of(dom.name()) is None:
                    continue
                try:
                    meta = _metadata_of(dom)
                    if meta is not None:
                        found.append(VmInfo(handle=_handle(meta), state=_state_of(dom)))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # gone meanwhile
                        raise
            return found

        return await self._run(list_sync)

    async def agent_socket(self, capsule_id: str) -> Path:
        _dom, meta = await self._ours(capsule_id)
        return meta.agent_socket_path

    async def pause(self, capsule_id: str) -> None:
        dom, _meta = await self._ours(capsule_id)
        await self._run(dom.suspend, capsule_id=capsule_id)

    async def resume(self, capsule_id: str) -> None:
        dom, _meta = await self._ours(capsule_id)
        await self._run(dom.resume, capsule_id=capsule_id)

    async def save(self, capsule_id: str, path: Path) -> None:
        dom, meta = await self._ours(capsule_id)
        await self._run(dom.save, str(path), capsule_id=capsule_id)
        meta.agent_socket_path.unlink(missing_ok=True)

    async def restore(self, path: Path, *, memory_file: Path | None = None,
                      paused: bool = False) -> VmHandle:
        xml = await self._run(self._conn.saveImageGetXMLDesc, str(path), 0)
        meta = parse_metadata(xml)
        if meta is None:
            raise DriverError(f"{path}: not a saved Dovecote VM")
        if memory_file is not None and self.emulator is None:
            raise DriverError("restoring into a memory file needs Dovecote's QEMU wrapper")
        if await self._exists(meta.capsule_id):
            raise VmExists(f"capsule {meta.capsule_id} already has a VM")
        # The saved document may carry the wrapper settings of the VM's first start
        # (a copy-on-write map of a template): a restore brings the whole RAM back
        # from the save file into anonymous memory, or into ``memory_file``.
        env = {}
        if memory_file is not None:
            env = {"DOVECOTE_MEM_PATH": str(memory_file), "DOVECOTE_MEM_SHARE": "true"}
        if memory_file is not None:
            await trio.to_thread.run_sync(self._prepare_memory_file, memory_file)
        dxml = set_emulator_env(xml, env, self.emulator if memory_file is not None else None)
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        meta.agent_socket_path.unlink(missing_ok=True)
        await self._run(self._conn.restoreFlags, str(path), dxml, flags, capsule_id=meta.capsule_id)
        return _handle(meta)

    async def screenshot(self, capsule_id: str) -> bytes:
        """The VM's display now, as PNG (``virDomainScreenshot``, see :mod:`.screenshots`)."""
        from .screenshots import ScreenshotError, capture

        dom, _meta = await self._ours(capsule_id)
        try:
            return await self._run(capture, self._conn, dom, capsule_id=capsule_id)
        except ScreenshotError as exc:
            raise DriverError(f"capsule {capsule_id}: {exc}") from exc

    async def display_socket(self, capsule_id: str) -> Path | None:
        """The VNC socket libvirt placed for the domain, read from its live XML."""
        dom, _meta = await self._ours(capsule_id)
        return vnc_socket_of(await self._run(dom.XMLDesc, 0, capsule_id=capsule_id))

    async def aclose(self) -> None:
        await self._run(self._conn.close)

    async def stats(self, capsule_id: str) -> VmStats:
        """vCPU time (``virDomainGetVcpus``, else the domain's), memory, overlay blocks."""
        dom, meta = await self._ours(capsule_id)
        return await self._run(_read_stats, dom, meta.overlay_path, capsule_id=capsule_id)


def _read_stats(dom: libvirt.virDomain, overlay: Path) -> VmStats:
    """One VM's counters (blocking; :meth:`LibvirtDriver.stats`)."""
    _state, _max_kib, _mem_kib, vcpus, cpu_ns = dom.info()
    try:  # the vCPU threads only: the guest's work, not QEMU's own
        cpu_ns = sum(int(vcpu[2]) for vcpu in dom.vcpus()[0]) or cpu_ns
    except libvirt.libvirtError:
        pass
    memory = dom.memoryStats()
    if "available" in memory and ("usable" in memory or "unused" in memory):  # a balloon reports
        used_kib = memory["available"] - memory.get("usable", memory.get("unused", 0))
    else:
        used_kib = memory.get("rss", 0)
    try:
        disk = os.stat(overlay).st_blocks * 512
    except OSError:
        disk = 0
    return VmStats(cpu_time_ns=int(cpu_ns), vcpus=int(vcpus), memory_bytes=max(0, int(used_kib)) * 1024,
                   disk_bytes=disk)


def _qemu_owner(capabilities_xml: str) -> tuple[int, int] | None:
    """The ``+uid:+gid`` of libvirt's DAC base label for QEMU domains, if any."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(capabilities_xml)
    except ET.ParseError:
        return None
    for secmodel in root.iter("secmodel"):
        if secmodel.findtext("model") != "dac":
            continue
        for label in secmodel.iter("baselabel"):
            if label.get("type") in ("qemu", "kvm") and label.text:
                uid, _, gid = label.text.partition(":")
                try:
                    return int(uid.lstrip("+")), int(gid.lstrip("+"))
                except ValueError:
                    return None
    return None


def _steps_ms(timings: dict[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): round(v * 1000, 1) for k, v in timings.items() if k.startswith(prefix)}


def _shared_ram(xml: str) -> Path | None:
    env = emulator_env_of(xml)
    path = env.get("DOVECOTE_MEM_PATH")
    return Path(path) if path and env.get("DOVECOTE_MEM_SHARE") == "true" else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fdatasync(f.fileno())
    os.replace(tmp, path)


def _commit(tmp: Path, image: Path) -> None:
    os.replace(tmp, image)
    _fsync_dir(image.parent)


def _uncommit(image: Path) -> None:
    image.unlink(missing_ok=True)
    _fsync_dir(image.parent)


def _copy_file_to_fd(path: Path, fd: int) -> None:
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]


def _copy_fd_to_file(fd: int, path: Path) -> None:
    with path.open("wb") as target:
        while chunk := os.read(fd, 1 << 20):
            target.write(chunk)


@asynccontextmanager
async def open_libvirt_driver(
    uri: str = DEFAULT_URI, *, accel: Accel, max_threads: int = 8, emulator: Path | None = None,
    own_ram: bool = True,
) -> AsyncIterator[LibvirtDriver]:
    """Connect to libvirt and yield a driver; the connection closes on exit, the VMs keep running.

    Raises:
        DriverUnavailable: libvirtd does not answer at ``uri``.
    """
    limiter = trio.CapacityLimiter(max_threads)
    try:
        conn = await trio.to_thread.run_sync(libvirt.open, uri, limiter=limiter)
    except libvirt.libvirtError as exc:
        raise DriverUnavailable(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}") from exc
    driver = LibvirtDriver(conn, accel=accel, limiter=limiter, emulator=emulator, own_ram=own_ram)
    try:
        caps = await trio.to_thread.run_sync(conn.getCapabilities, limiter=limiter)
        driver.qemu_owner = _qemu_owner(caps)
    except libvirt.libvirtError:
        log.warning("cannot read libvirt's capabilities: RAM files stay owned by root")
    try:
        await driver.settle()
    except DriverError as exc:
        log.warning("could not settle interrupted pauses and resumes: %s", exc)
    try:
        yield driver
    finally:
        with trio.CancelScope(shield=True):
            await driver.aclose()
