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
import logging
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import trio

from .accel import Accel
from .domain_xml import (
    METADATA_NS,
    DomainConfig,
    Metadata,
    build_domain_xml,
    capsule_id_of,
    domain_name,
    parse_metadata,
    valid_capsule_id,
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
)

log = logging.getLogger(__name__)

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

    def __init__(self, conn: libvirt.virConnect, *, accel: Accel, limiter: trio.CapacityLimiter) -> None:
        self._conn = conn
        self.accel = accel
        self._limiter = limiter

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

    @staticmethod
    async def _create_overlay(spec: VmSpec) -> None:
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                "-b", str(spec.backing_disk.resolve()), str(spec.overlay_path)]  # fmt: skip
        if spec.disk_size_mib is not None:
            argv.append(f"{spec.disk_size_mib}M")
        result = await trio.run_process(
            argv, stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False
        )
        if result.returncode != 0:
            raise DriverError(f"qemu-img create failed: {result.stderr.decode(errors='replace').strip()}")

    # -- the interface -----------------------------------------------------

    async def create(self, spec: VmSpec) -> VmHandle:
        if not valid_capsule_id(spec.capsule_id):
            raise DriverError(f"invalid capsule id {spec.capsule_id!r}")
        try:
            xml = build_domain_xml(
                DomainConfig(
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
                )
            )
        except ValueError as exc:
            raise DriverError(str(exc)) from exc
        if await self._exists(spec.capsule_id):
            raise VmExists(f"capsule {spec.capsule_id} already has a VM")
        created_overlay = not spec.overlay_path.exists()
        if created_overlay:
            await self._create_overlay(spec)
        spec.agent_socket_path.unlink(missing_ok=True)  # a stale socket of an earlier VM
        try:
            await self._run(self._conn.createXML, xml, 0, capsule_id=spec.capsule_id)
        except DriverError:
            if created_overlay:
                spec.overlay_path.unlink(missing_ok=True)
            raise
        log.info("capsule %s: VM started (%s)", spec.capsule_id, self.accel)
        return VmHandle(
            capsule_id=spec.capsule_id,
            name=domain_name(spec.capsule_id),
            accel=self.accel,
            overlay_path=spec.overlay_path,
            agent_socket_path=spec.agent_socket_path,
            console_log_path=spec.console_log_path,
        )

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
        log.info("capsule %s: VM destroyed", capsule_id)

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

    async def restore(self, path: Path) -> VmHandle:
        xml = await self._run(self._conn.saveImageGetXMLDesc, str(path), 0)
        meta = parse_metadata(xml)
        if meta is None:
            raise DriverError(f"{path}: not a saved Dovecote VM")
        if await self._exists(meta.capsule_id):
            raise VmExists(f"capsule {meta.capsule_id} already has a VM")
        meta.agent_socket_path.unlink(missing_ok=True)
        await self._run(self._conn.restore, str(path), capsule_id=meta.capsule_id)
        return _handle(meta)

    async def aclose(self) -> None:
        await self._run(self._conn.close)


@asynccontextmanager
async def open_libvirt_driver(
    uri: str = DEFAULT_URI, *, accel: Accel, max_threads: int = 8
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
    driver = LibvirtDriver(conn, accel=accel, limiter=limiter)
    try:
        yield driver
    finally:
        with trio.CancelScope(shield=True):
            await driver.aclose()
