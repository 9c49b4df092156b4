"""The Cloud Hypervisor driver: one ``cloud-hypervisor`` process per capsule VM.

Cloud Hypervisor (CH) has no daemon that owns many VMs the way libvirtd does:
each VM is one VMM process, driven through a REST API (HTTP/1.1, JSON bodies)
on a unix socket (``--api-socket path=...``). This module speaks that API with
httpx over the socket and keeps, per capsule, what libvirt would keep for us.

Processes
---------
The VMM of a capsule is started *detached*: a short-lived Python trampoline
(:func:`spawn_detached`) forks, the child calls ``setsid()`` and execs
``cloud-hypervisor``, the trampoline prints the child's pid and exits. So the
VMM is not vmmgr's child (no zombie to reap), lives in its own session (a
signal to vmmgr's process group does not reach it) and survives a restart, or
a SIGKILL, of vmmgr, just as libvirt's QEMU processes do; reconcile finds it
again. Supervising the VMMs in a Trio nursery instead would have tied every
running capsule to vmmgr's own life. The pid goes to a pid file, used only to
make sure a VMM is gone after ``vmm.shutdown`` (SIGKILL after a grace), and
only while ``/proc/<pid>/cmdline`` still names the VM's API socket (a pid can
be reused).

Files
-----
Everything the driver owns lives in ``<run_dir>/<capsule id>/``:

==============  ==============================================================
``ch.json``     Dovecote's metadata (capsule id, accelerator, the paths of the
                capsule's files): what libvirt's ``<metadata>`` is to the
                libvirt driver. A VM is ours, and listed, iff this file exists
                under the run directory, so several installations never see
                each other's VMs.
``ch.sock``     CH's API socket (and ``ch.sock.lock``, CH's own lock).
``ch.pid``      the VMM's pid.
``ch.log``      the VMM's stdout and stderr (kept after destroy, for post-mortems).
``vsock.sock``  CH's vsock multiplexer: the guest agent's channel (below).
==============  ==============================================================

plus the :class:`~dovecote.vmmgr.driver.VmSpec`'s own files: the qcow2 overlay
(created here with ``qemu-img`` over the base disk, as the libvirt driver
does; CH opens it with ``backing_files`` allowed), the serial console written
to the console log (``serial: File``; the guest's ``console=ttyS0`` is CH's
16550 port), and the agent socket.

API sequences
-------------
- create: overlay, ``ch.json``, spawn, ``vmm.ping`` until the API answers,
  ``vm.create`` (kernel, initramfs, command line, the overlay, memory in bytes,
  vCPUs, rng, serial, vsock), ``vm.boot``.
- pause / resume: ``vm.pause`` / ``vm.resume``.
- save(path): ``vm.pause``, ``vm.snapshot`` to ``file://<path>`` (a directory:
  CH writes ``config.json``, ``state.json`` and ``memory-ranges``; the driver
  adds ``dovecote-vm.json``), then the VMM is stopped. The overlay stays.
- restore(path): a fresh VMM, ``vm.restore`` with ``memory_restore_mode:
  OnDemand`` and ``resume: false``, then the agent channel is re-plumbed
  (relay below) and ``vm.resume``. On demand, guest pages are faulted in from
  ``memory-ranges`` through userfaultfd as the guest touches them, so a restore
  is fast whatever the memory size, but the saved directory backs the guest's
  memory: it must stay until the VM stops. (The JSON API spells the mode
  ``OnDemand``; ``ondemand`` is the command line's spelling.)
- destroy / stop: ``vm.shutdown`` (immediate, no guest shutdown), ``vmm.shutdown``,
  then SIGKILL if the process is still there after a grace; files removed.

States: ``vm.info``'s ``Running`` is RUNNING, ``Paused`` PAUSED, ``Shutdown``
STOPPED, ``Created`` (and anything else) OTHER, as is a VMM that runs without a
VM. A VMM that is gone while its files remain is CRASHED: the guest powered
off (CH exits then), or the VMM crashed or was killed. :meth:`list` reports it
so that reconcile destroys it, which removes the files. Operations on such a
VM raise :class:`~dovecote.vmmgr.driver.VmNotFound`; a VMM that does not answer
its API in time raises :class:`~dovecote.vmmgr.driver.DriverUnavailable`; CH's
own errors (HTTP 500, its JSON list of messages) become
:class:`~dovecote.vmmgr.driver.DriverError` with CH's message.

The guest agent channel
-----------------------
CH has no virtio-serial port. Its choices are a virtio-console or serial port
in socket mode, or virtio-vsock; this driver uses vsock. A console is a tty
with no notion of the host connecting or leaving, so the agent would never see
EOF between two host connections (its sessions rely on it) and a frame cut by
a dropped connection would desynchronise the next one. vsock gives one guest
connection per host connection, with a clean EOF, as the virtio-serial port
does under QEMU.

Host side: CH exposes the guest's vsock ports through one unix socket; a host
connection first writes ``CONNECT <port>\\n`` and reads ``OK <host port>\\n``.
The :class:`~dovecote.vmmgr.driver.Driver` contract says the agent socket
speaks the agent protocol directly (:func:`dovecote.vmmgr.guest.open_agent`),
so the driver runs a small relay per VM: it listens on the spec's agent
socket and, for each connection, connects to ``vsock.sock``, does the
handshake for :data:`AGENT_VSOCK_PORT` and splices bytes both ways. A guest
that is not listening yet makes the relay close the connection, which
``open_agent`` retries. Relays run in the nursery given to the driver (the
service's) and are started again for the VMs found in the run directory when
the driver opens, so agents are reachable again after a restart of vmmgr.

Guest side: a CH guest has no virtio-serial port, so the image loads the
``vmw_vsock_virtio_transport`` module (``OPTIONAL_MODULES`` in
``infra/guest/build.py``) and its init starts the agent with ``--listen-vsock
1024`` when the virtio-serial port is missing and ``/dev/vsock`` exists; the
agent serves one host connection at a time there through the same session code.

Not here yet: networking (CH has no user-mode networking; a capsule gets no
network device until a tap with NAT, or passt through vhost-user, is set up),
and a guest reboot reboots the VM in place (libvirt's domains stop instead).

Templating (``VmSpec.memory_file``, ``incoming_state``, :meth:`Driver.freeze`) is
not offered: create refuses such a spec. :meth:`CloudHypervisorDriver.stats`
reads ``/proc`` (the vCPU threads' CPU time, the VMM's resident set), not the
API, because the sampler calls it often; CH's own per-device counters are
:meth:`CloudHypervisorDriver.counters` (``vm.counters``).

Requirements: KVM (CH has no TCG: :func:`open_ch_driver` refuses another
accelerator); Cloud Hypervisor v50.1 or later, the first release that opens a
qcow2 overlay's backing file (``backing_files``; direct boot of the image's
bzImage came earlier); userfaultfd (root, or ``vm.unprivileged_userfaultfd``)
for on-demand restores.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

from dovecote.libs.logs import get_logger

from .accel import Accel
from .domain_xml import MAX_SOCKET_PATH, domain_name, valid_capsule_id
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
from .overlay import create_overlay

log = get_logger("dovecote.vmmgr.ch_driver")

T = TypeVar("T")

DEFAULT_BINARY = "cloud-hypervisor"
AGENT_VSOCK_PORT = 1024
"""The guest's vsock port where the agent listens."""
GUEST_CID = 3
"""The guest's vsock context id. CH's vsock is a per-VMM userspace device, so every VM can use 3."""

META_FILE = "ch.json"
API_SOCKET = "ch.sock"
PID_FILE = "ch.pid"
VMM_LOG = "ch.log"
VSOCK_SOCKET = "vsock.sock"
SAVED_META = "dovecote-vm.json"
META_VERSION = 1

API_ROOT = "http://localhost/api/v1/"
VSOCK_HANDSHAKE_S = 5.0

_STATES = {
    "Running": VmState.RUNNING,
    "Paused": VmState.PAUSED,
    "Shutdown": VmState.STOPPED,
    "Created": VmState.OTHER,
}

Spawn = Callable[[Sequence[str], Path], Awaitable[int]]
"""Starts a VMM: ``spawn(argv, log_path)`` returns its pid once it runs (see :func:`spawn_detached`)."""


class _VmmNotRunning(VmNotFound):
    """Nothing listens on the VM's API socket: its VMM is gone (or not started yet)."""


class _VsockRefused(Exception):
    """CH's vsock multiplexer did not accept a connection to the agent's port."""


# -- metadata --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Meta:
    """What ``ch.json`` records of one VM, and where its files are."""

    capsule_id: str
    accel: Accel
    directory: Path
    """``<run_dir>/<capsule id>``: not stored (it is where the file is)."""
    overlay_path: Path
    agent_socket_path: Path
    console_log_path: Path
    vcpus: int
    vsock_port: int = AGENT_VSOCK_PORT

    @property
    def api_socket(self) -> Path:
        return self.directory / API_SOCKET

    @property
    def pid_file(self) -> Path:
        return self.directory / PID_FILE

    @property
    def vmm_log(self) -> Path:
        return self.directory / VMM_LOG

    @property
    def vsock_socket(self) -> Path:
        return self.directory / VSOCK_SOCKET

    def handle(self) -> VmHandle:
        return VmHandle(
            capsule_id=self.capsule_id,
            name=domain_name(self.capsule_id),
            accel=self.accel,
            overlay_path=self.overlay_path,
            agent_socket_path=self.agent_socket_path,
            console_log_path=self.console_log_path,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": META_VERSION,
                "capsule": self.capsule_id,
                "accel": self.accel.value,
                "overlay": str(self.overlay_path),
                "agent_socket": str(self.agent_socket_path),
                "console_log": str(self.console_log_path),
                "vcpus": self.vcpus,
                "vsock_port": self.vsock_port,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, directory: Path) -> _Meta | None:
        """The metadata in ``text`` for a VM whose files are in ``directory``; ``None`` if unreadable."""
        try:
            data = json.loads(text)
            if data["version"] != META_VERSION or not valid_capsule_id(data["capsule"]):
                return None
            return cls(
                capsule_id=str(data["capsule"]),
                accel=Accel(data["accel"]),
                directory=directory,
                overlay_path=Path(data["overlay"]),
                agent_socket_path=Path(data["agent_socket"]),
                console_log_path=Path(data["console_log"]),
                vcpus=int(data["vcpus"]),
                vsock_port=int(data["vsock_port"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def _vm_config(spec: VmSpec, meta: _Meta) -> dict[str, Any]:
    """The ``vm.create`` body (CH's ``VmConfig``) for ``spec``."""
    return {
        "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpus},
        "memory": {"size": spec.memory_mib * 1024 * 1024},
        "payload": {
            "kernel": str(spec.image.kernel),
            "initramfs": str(spec.image.initrd),
            "cmdline": spec.image.cmdline,
        },
        "disks": [{"path": str(spec.overlay_path), "image_type": "Qcow2", "backing_files": True}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "File", "file": str(spec.console_log_path)},
        "console": {"mode": "Off"},
        "vsock": {"cid": GUEST_CID, "socket": str(meta.vsock_socket)},
    }


def _file_url(path: Path) -> str:
    # CH strips ``file://`` and takes the rest as the path, without
    # percent-decoding: no Path.as_uri() here.
    return f"file://{path}"


def _error_message(response: httpx.Response) -> str:
    """CH's error text: its body is a JSON list of messages, outermost first."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, list):
        return ": ".join(str(part) for part in body)
    return body if isinstance(body, str) else json.dumps(body)


# -- blocking helpers (run in worker threads) ------------------------------


def _read_meta(directory: Path) -> _Meta | None:
    try:
        text = (directory / META_FILE).read_text()
    except OSError:
        return None
    meta = _Meta.from_json(text, directory)
    return meta if meta is not None and meta.capsule_id == directory.name else None


def _scan(run_dir: Path) -> list[_Meta]:
    try:
        children = sorted(run_dir.iterdir())
    except OSError:
        return []
    found = []
    for child in children:
        if valid_capsule_id(child.name) and child.is_dir():
            meta = _read_meta(child)
            if meta is not None:
                found.append(meta)
    return found


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prepare_launch(meta: _Meta) -> None:
    """Clear what an earlier VMM of this capsule left and record the metadata."""
    meta.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    for path in (meta.api_socket, meta.api_socket.with_name(API_SOCKET + ".lock"), meta.pid_file,
                 meta.vsock_socket, meta.agent_socket_path):  # fmt: skip
        path.unlink(missing_ok=True)
    _write_atomic(meta.directory / META_FILE, meta.to_json())


def _remove_files(meta: _Meta, remove_disk: bool) -> None:
    for path in (meta.api_socket, meta.api_socket.with_name(API_SOCKET + ".lock"), meta.pid_file,
                 meta.vsock_socket, meta.agent_socket_path, meta.directory / META_FILE):  # fmt: skip
        path.unlink(missing_ok=True)
    if remove_disk:
        meta.overlay_path.unlink(missing_ok=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs (not a zombie) and its command line contains ``marker`` (our API socket)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    fields = stat.rpartition(b")")[2].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return False
    # A process that is exiting has no command line any more: gone too.
    return marker.encode() in cmdline


def _read_stats(meta: _Meta) -> VmStats | None:
    """The VM's counters from ``/proc`` (no API call: the sampler reads them often); ``None`` if gone.

    CPU time is the vCPU threads' (CH names them ``vcpu<N>``), the guest's work
    rather than the VMM's own; memory is the VMM's resident set (no balloon).
    """
    pid = _read_pid(meta.pid_file)
    if pid is None or not _pid_alive(pid, str(meta.api_socket)):
        return None
    ticks = 0
    found = False
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                comm, _, rest = (task / "stat").read_bytes().partition(b" (")[2].rpartition(b")")
                if comm.startswith(b"vcpu"):
                    fields = rest.split()
                    ticks += int(fields[11]) + int(fields[12])  # utime, stime
                    found = True
    try:
        if not found:
            fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
            ticks = int(fields[11]) + int(fields[12])
        resident_pages = int(Path(f"/proc/{pid}/statm").read_bytes().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    try:
        disk = meta.overlay_path.stat().st_blocks * 512
    except OSError:
        disk = 0
    return VmStats(
        cpu_time_ns=ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK"),
        vcpus=meta.vcpus,
        memory_bytes=resident_pages * os.sysconf("SC_PAGE_SIZE"),
        disk_bytes=disk,
    )


def _kill(pid: int, marker: str) -> None:
    if _pid_alive(pid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tail(path: Path, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _snapshot_dir(path: Path) -> Path:
    path = path.resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DriverError(f"cannot use {path} as a snapshot directory: {exc}") from exc
    return path


def _read_saved(path: Path) -> str:
    try:
        return (path / SAVED_META).read_text()
    except OSError as exc:
        raise DriverError(f"{path}: not a saved Dovecote VM ({exc})") from exc


# -- spawning --------------------------------------------------------------

# Runs as ``python -c _DETACH LOG ARGV...``: forks; the child starts a session,
# points stdin at /dev/null and stdout/stderr at LOG, and execs ARGV. A
# close-on-exec pipe tells the parent whether the exec happened; the parent
# prints the child's pid and exits, so the child is reparented to init.
_DETACH = r"""
import os, sys
log, argv = sys.argv[1], sys.argv[2:]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.close(r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.execvp(argv[0], argv)
    except BaseException as exc:
        os.write(w, f"{argv[0]}: {exc}".encode())
    os._exit(127)
os.close(w)
error = os.read(r, 4096)
if error:
    os.waitpid(pid, 0)
    sys.exit(error.decode(errors="replace"))
print(pid)
"""


async def spawn_detached(argv: Sequence[str], log_path: Path) -> int:
    """Start ``argv`` in its own session, not as our child, output appended to ``log_path``.

    Returns its pid once it has exec'd.

    Raises:
        DriverError: the program could not be started.
    """
    result = await trio.run_process(
        [sys.executable, "-c", _DETACH, str(log_path), *argv],
        stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise DriverError(f"cannot start {argv[0]}: {result.stderr.decode(errors='replace').strip()}")
    return int(result.stdout.split()[-1])


# -- the agent relay -------------------------------------------------------


async def _open_vsock(path: Path, port: int) -> tuple[trio.SocketStream, bytes]:
    """Connect to CH's vsock multiplexer and to the guest's ``port``; returns bytes read past ``OK``."""
    stream = await trio.open_unix_socket(str(path))
    try:
        await stream.send_all(b"CONNECT %d\n" % port)
        answer = bytearray()
        with trio.fail_after(VSOCK_HANDSHAKE_S):
            while b"\n" not in answer:
                chunk = await stream.receive_some(256)
                if not chunk or len(answer) > 256:
                    raise _VsockRefused(f"no connection to guest port {port}")
                answer += chunk
        line, _, rest = bytes(answer).partition(b"\n")
        if not line.startswith(b"OK "):
            raise _VsockRefused(f"guest port {port}: {line!r}")
        return stream, rest
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        done.cancel()


async def _relay_connection(meta: _Meta, client: trio.SocketStream) -> None:
    """One agent connection: the vsock handshake, then bytes both ways until either side ends."""
    try:
        async with client:
            try:
                upstream, early = await _open_vsock(meta.vsock_socket, meta.vsock_port)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, _VsockRefused) as exc:
                # Closing the client's connection makes open_agent try again.
                log.debug("agent not reachable over vsock",
                          extra={"capsule_id": meta.capsule_id, "error": str(exc)})
                return
            async with upstream:
                if early:
                    await client.send_all(early)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)
    except Exception:  # one connection never ends the relay
        log.debug("agent relay connection failed", exc_info=True, extra={"capsule_id": meta.capsule_id})


# -- the driver ------------------------------------------------------------


class CloudHypervisorDriver(Driver):
    """Capsule VMs as Cloud Hypervisor processes (see :func:`open_ch_driver`).

    Besides the :class:`~dovecote.vmmgr.driver.Driver` interface it offers
    :meth:`counters` (CH's ``vm.counters``).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        accel: Accel,
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter,
        binary: str = DEFAULT_BINARY,
        spawn: Spawn | None = None,
        api_timeout_s: float = 30.0,
        snapshot_timeout_s: float = 600.0,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        probe_timeout_s: float = 5.0,
    ) -> None:
        self.run_dir = Path(os.path.abspath(run_dir))
        self.accel = accel
        self.binary = binary
        self._nursery = nursery
        self._limiter = limiter
        self._spawn: Spawn = spawn or spawn_detached
        self._api_timeout_s = api_timeout_s
        self._snapshot_timeout_s = snapshot_timeout_s
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._probe_timeout_s = probe_timeout_s
        self._locks: dict[str, trio.Lock] = {}
        self._relays: dict[str, trio.CancelScope] = {}
        # Never used for TLS (the API is plain HTTP on a unix socket); given to
        # httpx so that it does not load the CA bundle for every request.
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    # -- plumbing ----------------------------------------------------------

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)

    def _dir(self, capsule_id: str) -> Path:
        return self.run_dir / capsule_id

    def _lock(self, capsule_id: str) -> trio.Lock:
        return self._locks.setdefault(capsule_id, trio.Lock())

    def _forget_lock(self, capsule_id: str) -> None:
        lock = self._locks.get(capsule_id)
        if lock is not None and not lock.locked() and lock.statistics().tasks_waiting == 0:
            del self._locks[capsule_id]

    async def _meta(self, capsule_id: str) -> _Meta:
        if not valid_capsule_id(capsule_id):
            raise VmNotFound(f"no VM for capsule {capsule_id!r}")
        meta = await self._thread(_read_meta, self._dir(capsule_id))
        if meta is None:
            raise VmNotFound(f"no VM for capsule {capsule_id}")
        return meta

    async def _call(
        self, meta: _Meta, method: str, endpoint: str, body: Any = None, *, time_limit_s: float | None = None
    ) -> Any:
        """One API request; returns the decoded JSON body, or ``None`` for 204."""
        limit = time_limit_s or self._api_timeout_s
        transport = httpx.AsyncHTTPTransport(uds=str(meta.api_socket), verify=self._ssl)
        try:
            async with httpx.AsyncClient(transport=transport, timeout=limit) as client:
                response = await client.request(method, API_ROOT + endpoint, json=body)
        except httpx.ConnectError as exc:
            raise _VmmNotRunning(f"capsule {meta.capsule_id}: its cloud-hypervisor is not running") from exc
        except httpx.TimeoutException as exc:
            raise DriverUnavailable(
                f"capsule {meta.capsule_id}: cloud-hypervisor did not answer {endpoint} within {limit:g} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise DriverError(f"capsule {meta.capsule_id}: {endpoint}: {exc}") from exc
        if response.status_code >= 400:
            text = f"capsule {meta.capsule_id}: {endpoint} failed: {_error_message(response)}"
            # CH answers 404 when the VMM has no VM (never created, or deleted).
            raise VmNotFound(text) if response.status_code == 404 else DriverError(text)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise DriverError(
                f"capsule {meta.capsule_id}: {endpoint}: not JSON: {response.text[:200]}"
            ) from exc

    async def _probe(self, meta: _Meta) -> VmState:
        """The VM's state from ``vm.info``; CRASHED when its VMM is gone."""
        try:
            info = await self._call(meta, "GET", "vm.info", time_limit_s=self._probe_timeout_s)
        except _VmmNotRunning:
            pid = await self._thread(_read_pid, meta.pid_file)
            if pid is not None and await self._thread(_pid_alive, pid, str(meta.api_socket)):
                return VmState.OTHER  # starting or stopping
            return VmState.CRASHED
        except VmNotFound:
            return VmState.OTHER  # the VMM runs without a VM
        state = info.get("state") if isinstance(info, dict) else None
        return _STATES.get(state, VmState.OTHER) if isinstance(state, str) else VmState.OTHER

    async def _observe(self, meta: _Meta) -> VmState:
        """:meth:`_probe` for callers outside an operation on the VM.

        A VM that one of our operations is starting (or stopping) has no API
        socket for a moment: that is OTHER, not CRASHED.
        """
        state = await self._probe(meta)
        lock = self._locks.get(meta.capsule_id)
        if state is VmState.CRASHED and lock is not None and lock.locked():
            return VmState.OTHER
        return state

    async def _launch(self, meta: _Meta) -> None:
        """Record the VM, start its VMM and wait until the API answers."""
        await self._thread(_prepare_launch, meta)
        argv = [self.binary, "--api-socket", f"path={meta.api_socket}"]
        pid = await self._spawn(argv, meta.vmm_log)
        await self._thread(_write_atomic, meta.pid_file, f"{pid}\n")
        marker = str(meta.api_socket)
        with trio.move_on_after(self._start_timeout_s):
            while True:
                try:
                    await self._call(meta, "GET", "vmm.ping", time_limit_s=self._start_timeout_s)
                    return
                except _VmmNotRunning:
                    if not await self._thread(_pid_alive, pid, marker):
                        tail = await self._thread(_tail, meta.vmm_log)
                        raise DriverError(
                            f"capsule {meta.capsule_id}: cloud-hypervisor exited at start: {tail}"
                        ) from None
                await trio.sleep(0.02)
        raise DriverError(
            f"capsule {meta.capsule_id}: cloud-hypervisor did not open its API "
            f"within {self._start_timeout_s:g} s"
        )

    async def _stop_vmm(self, meta: _Meta) -> None:
        """Stop the VM and its VMM, SIGKILL after a grace; returns once the process is gone."""
        for endpoint in ("vm.shutdown", "vmm.shutdown"):
            try:
                await self._call(meta, "PUT", endpoint, time_limit_s=self._stop_timeout_s)
            except _VmmNotRunning:
                break
            except DriverError as exc:  # no VM in it, or the VMM exits before it answers
                log.debug("VMM call failed", extra={"capsule_id": meta.capsule_id, "error": str(exc)})
        pid = await self._thread(_read_pid, meta.pid_file)
        if pid is None:
            return
        marker = str(meta.api_socket)
        for kill in (False, True):
            if kill:
                log.warning(
                    "capsule %s: cloud-hypervisor (pid %d) did not exit; killing it", meta.capsule_id, pid
                )
                await self._thread(_kill, pid, marker)
            with trio.move_on_after(self._stop_timeout_s):
                while True:
                    if not await self._thread(_pid_alive, pid, marker):
                        return
                    await trio.sleep(0.05)
        raise DriverError(f"capsule {meta.capsule_id}: cloud-hypervisor (pid {pid}) would not exit")

    async def _teardown(self, meta: _Meta, *, remove_disk: bool) -> None:
        await self._stop_relay(meta.capsule_id)
        await self._stop_vmm(meta)
        await self._thread(_remove_files, meta, remove_disk)

    async def _teardown_after_failure(self, meta: _Meta, *, remove_disk: bool) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self._teardown(meta, remove_disk=remove_disk)
            except DriverError:
                log.warning("cleanup after a failure failed", exc_info=True,
                            extra={"capsule_id": meta.capsule_id})

    async def _clear_leftovers(self, capsule_id: str) -> None:
        """Before starting a VMM: refuse if one runs, remove the files of a dead one."""
        meta = await self._thread(_read_meta, self._dir(capsule_id))
        if meta is None:
            return
        if await self._probe(meta) is not VmState.CRASHED:
            raise VmExists(f"capsule {capsule_id} already has a VM")
        log.info("removing the files of a VMM that is gone", extra={"capsule_id": capsule_id})
        await self._teardown(meta, remove_disk=False)

    # -- the agent relay -----------------------------------------------------

    async def _start_relay(self, meta: _Meta) -> None:
        await self._stop_relay(meta.capsule_id)
        self._relays[meta.capsule_id] = await self._nursery.start(self._serve_relay, meta)

    async def _stop_relay(self, capsule_id: str) -> None:
        scope = self._relays.pop(capsule_id, None)
        if scope is not None:
            scope.cancel()

    async def _serve_relay(
        self, meta: _Meta, *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on the agent socket and relay each connection to the guest's vsock port."""
        path = meta.agent_socket_path
        with trio.CancelScope() as scope, trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                await self._thread(functools.partial(path.unlink, missing_ok=True))
                await sock.bind(str(path))
                await self._thread(os.chmod, path, 0o600)
                sock.listen(16)
            except OSError as exc:
                raise DriverError(f"capsule {meta.capsule_id}: cannot listen on {path}: {exc}") from exc
            task_status.started(scope)
            try:
                await trio.serve_listeners(
                    functools.partial(_relay_connection, meta), [trio.SocketListener(sock)]
                )
            except Exception:  # runs in the service's nursery: never take it down
                log.exception("the agent relay stopped", extra={"capsule_id": meta.capsule_id})
            finally:
                if self._relays.get(meta.capsule_id) is scope:
                    del self._relays[meta.capsule_id]

    async def _adopt(self) -> None:
        """Start the agent relays of the VMs already in the run directory (after a restart)."""
        for meta in await self._thread(_scan, self.run_dir):
            try:
                await self._start_relay(meta)
            except DriverError:
                log.warning("no agent relay", exc_info=True, extra={"capsule_id": meta.capsule_id})

    # -- the interface -----------------------------------------------------

    def _check(self, spec: VmSpec) -> _Meta:
        if not valid_capsule_id(spec.capsule_id):
            raise DriverError(f"invalid capsule id {spec.capsule_id!r}")
        if spec.memory_file is not None or spec.incoming_state is not None:
            raise DriverError("the Cloud Hypervisor driver does not make or use VM templates")
        if spec.vcpus < 1:
            raise DriverError("vcpus must be at least 1")
        if spec.memory_mib < 64:
            raise DriverError("memory_mib must be at least 64")
        meta = _Meta(
            capsule_id=spec.capsule_id,
            accel=self.accel,
            directory=self._dir(spec.capsule_id),
            overlay_path=spec.overlay_path,
            agent_socket_path=spec.agent_socket_path,
            console_log_path=spec.console_log_path,
            vcpus=spec.vcpus,
        )
        for path in (meta.agent_socket_path, meta.api_socket, meta.vsock_socket):
            if len(str(path).encode()) > MAX_SOCKET_PATH:
                raise DriverError(f"socket path longer than {MAX_SOCKET_PATH} bytes: {path}")
        return meta

    async def create(self, spec: VmSpec) -> VmHandle:
        meta = self._check(spec)
        async with self._lock(spec.capsule_id):
            await self._clear_leftovers(spec.capsule_id)
            created_overlay = not await self._thread(spec.overlay_path.exists)
            if created_overlay:
                await create_overlay(spec)
            try:
                await self._launch(meta)
                await self._call(meta, "PUT", "vm.create", _vm_config(spec, meta))
                await self._call(meta, "PUT", "vm.boot")
                await self._start_relay(meta)
            except BaseException:
                await self._teardown_after_failure(meta, remove_disk=created_overlay)
                raise
        log.info("VM started", extra={"capsule_id": spec.capsule_id, "driver": "cloud-hypervisor"})
        return meta.handle()

    async def destroy(self, capsule_id: str, *, remove_disk: bool = True) -> None:
        async with self._lock(capsule_id):
            meta = await self._meta(capsule_id)
            await self._teardown(meta, remove_disk=remove_disk)
        self._forget_lock(capsule_id)
        log.info("VM destroyed", extra={"capsule_id": capsule_id})

    async def state(self, capsule_id: str) -> VmState:
        return await self._observe(await self._meta(capsule_id))

    async def list(self) -> builtins.list[VmInfo]:
        found = []
        for meta in await self._thread(_scan, self.run_dir):
            try:
                state = await self._observe(meta)
            except DriverError:  # one VMM that does not answer hides no other VM
                state = VmState.OTHER
            found.append(VmInfo(handle=meta.handle(), state=state))
        return found

    async def agent_socket(self, capsule_id: str) -> Path:
        meta = await self._meta(capsule_id)
        if await self._observe(meta) is VmState.CRASHED:
            raise VmNotFound(f"capsule {capsule_id}: its cloud-hypervisor is not running")
        if capsule_id not in self._relays:
            await self._start_relay(meta)
        return meta.agent_socket_path

    async def pause(self, capsule_id: str) -> None:
        async with self._lock(capsule_id):
            await self._call(await self._meta(capsule_id), "PUT", "vm.pause")

    async def resume(self, capsule_id: str) -> None:
        async with self._lock(capsule_id):
            await self._call(await self._meta(capsule_id), "PUT", "vm.resume")

    async def save(self, capsule_id: str, path: Path) -> None:
        """Snapshot into the directory ``path`` (created if missing), then stop the VMM."""
        async with self._lock(capsule_id):
            meta = await self._meta(capsule_id)
            try:
                await self._call(meta, "PUT", "vm.pause")
                paused_here = True
            except _VmmNotRunning:
                raise
            except DriverError:
                if await self._probe(meta) is not VmState.PAUSED:
                    raise
                paused_here = False  # paused already (by pause())
            try:
                target = await self._thread(_snapshot_dir, path)
                await self._call(meta, "PUT", "vm.snapshot", {"destination_url": _file_url(target)},
                                 time_limit_s=self._snapshot_timeout_s)  # fmt: skip
                await self._thread(_write_atomic, target / SAVED_META, meta.to_json())
            except BaseException:
                if paused_here:
                    with trio.CancelScope(shield=True), contextlib.suppress(DriverError):
                        await self._call(meta, "PUT", "vm.resume")
                raise
            await self._teardown(meta, remove_disk=False)
        self._forget_lock(capsule_id)
        log.info("VM saved", extra={"capsule_id": capsule_id, "path": str(path)})

    async def restore(self, path: Path, *, memory_file: Path | None = None, paused: bool = False) -> VmHandle:
        """Run the VM saved in the directory ``path`` (see :meth:`save`); ``path`` must stay while it runs.

        ``paused`` leaves the vCPUs stopped; ``memory_file`` (templating) is not supported.
        """
        if memory_file is not None:
            raise DriverError("the Cloud Hypervisor driver does not restore into a memory file")
        source = await self._thread(path.resolve)
        saved = _Meta.from_json(await self._thread(_read_saved, source), self.run_dir)
        if saved is None:
            raise DriverError(f"{path}: not a saved Dovecote VM")
        meta = dataclasses.replace(saved, directory=self._dir(saved.capsule_id))
        async with self._lock(meta.capsule_id):
            await self._clear_leftovers(meta.capsule_id)
            try:
                await self._launch(meta)
                await self._call(
                    meta, "PUT", "vm.restore",
                    {"source_url": _file_url(source), "memory_restore_mode": "OnDemand", "resume": False},
                    time_limit_s=self._snapshot_timeout_s,
                )  # fmt: skip
                # Re-plumb before the guest runs: CH bound a new vsock socket.
                await self._start_relay(meta)
                if not paused:
                    await self._call(meta, "PUT", "vm.resume")
            except BaseException:
                await self._teardown_after_failure(meta, remove_disk=False)
                raise
        log.info("VM restored", extra={"capsule_id": meta.capsule_id, "path": str(path)})
        return meta.handle()

    async def stats(self, capsule_id: str) -> VmStats:
        """vCPU threads' CPU time, the VMM's resident set, the overlay's blocks (from ``/proc``)."""
        stats = await self._thread(_read_stats, await self._meta(capsule_id))
        if stats is None:
            raise VmNotFound(f"capsule {capsule_id}: its cloud-hypervisor is not running")
        return stats

    async def counters(self, capsule_id: str) -> dict[str, dict[str, int]]:
        """CH's per-device counters (``vm.counters``): ``{device: {counter: value}}``."""
        result = await self._call(await self._meta(capsule_id), "GET", "vm.counters")
        return result if isinstance(result, dict) else {}

    async def aclose(self) -> None:
        """Stop the agent relays; the VMs keep running (the next driver relays again)."""
        for capsule_id in builtins.list(self._relays):
            await self._stop_relay(capsule_id)


@asynccontextmanager
async def open_ch_driver(
    run_dir: Path,
    *,
    accel: Accel,
    nursery: trio.Nursery,
    binary: str = DEFAULT_BINARY,
    max_threads: int = 8,
    spawn: Spawn | None = None,
) -> AsyncIterator[CloudHypervisorDriver]:
    """A driver for the VMs under ``run_dir``; on exit its relays stop, the VMs keep running.

    Args:
        run_dir: the capsules' directory (``<run_dir>/<capsule id>/``); only VMs
            recorded there are listed.
        accel: the accelerator chosen for this host; must be KVM.
        nursery: where the agent relays run (the service's nursery).
        binary: the ``cloud-hypervisor`` executable (a name on ``PATH`` or a path).
        max_threads: worker threads for blocking file work.
        spawn: starts a VMM (default :func:`spawn_detached`); tests replace it.

    Raises:
        DriverUnavailable: the accelerator is not KVM, or ``binary`` is not found.
    """
    if accel is not Accel.KVM:
        raise DriverUnavailable(f"Cloud Hypervisor runs guests under KVM only (this host: {accel})")
    if spawn is None:
        found = await trio.to_thread.run_sync(shutil.which, binary)
        if found is None:
            raise DriverUnavailable(f"no cloud-hypervisor executable {binary!r}")
        binary = found
    driver = CloudHypervisorDriver(
        run_dir,
        accel=accel,
        nursery=nursery,
        limiter=trio.CapacityLimiter(max_threads),
        binary=binary,
        spawn=spawn,
    )
    try:
        await driver._adopt()
        yield driver
    finally:
        with trio.CancelScope(shield=True):
            await driver.aclose()
