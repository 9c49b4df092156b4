"""The VM driver interface: what vmmgr asks of a hypervisor, whichever it is.

A *driver* runs capsule VMs on this host: libvirt/QEMU
(:mod:`dovecote.vmmgr.libvirt_driver`) or Cloud Hypervisor
(:mod:`dovecote.vmmgr.ch_driver`), chosen by ``DOVECOTE_VM_DRIVER``. vmmgr talks to
the interface only; the hypervisor library stays behind it, and blocking calls
run in worker threads bounded by a :class:`trio.CapacityLimiter`.

A capsule VM boots a :class:`~dovecote.vmmgr.images.GuestImage` from its own
copy-on-write overlay (over the image's read-only base disk, or over a
template's disk) and exposes the guest agent's virtio-serial port as a unix
socket on the host (:meth:`Driver.agent_socket`; connect with
:func:`dovecote.vmmgr.guest.open_agent`).

VMs are named after their capsule and marked as Dovecote's, so :meth:`Driver.list`
finds them again after vmmgr restarts (reconcile).

Exceptions::

    DriverError                 anything the hypervisor refused or failed to do
     ├── DriverUnavailable      the hypervisor cannot be reached (libvirtd down...)
     ├── VmNotFound             no VM for this capsule on this host
     └── VmExists               a VM for this capsule is already running
"""

from __future__ import annotations

import abc
import builtins
import enum
from dataclasses import dataclass
from pathlib import Path

from dovecote.vmmgr.errors import VmmgrError

from .accel import Accel
from .images import GuestImage


class DriverError(VmmgrError):
    """A VM operation failed."""


class DriverUnavailable(DriverError):
    """The hypervisor cannot be reached."""


class VmNotFound(DriverError):
    """There is no VM for this capsule on this host."""


class VmExists(DriverError):
    """A VM for this capsule already exists."""


class VmState(enum.StrEnum):
    """What a VM is doing, as far as the hypervisor knows."""

    RUNNING = "running"
    PAUSED = "paused"
    """vCPUs stopped, memory kept (:meth:`Driver.pause`)."""
    STOPPED = "stopped"
    CRASHED = "crashed"
    OTHER = "other"
    """Starting, stopping, or a state we do not map."""


@dataclass(frozen=True, kw_only=True)
class VmSpec:
    """What to run for one capsule.

    The driver creates ``overlay_path`` (qcow2, backed by ``base_disk``) unless it
    exists, creates ``agent_socket_path`` and writes ``console_log_path``; their
    parent directories must exist. ``agent_socket_path`` must fit in a unix
    socket address (at most 107 bytes).
    """

    capsule_id: str
    image: GuestImage
    vcpus: int
    memory_mib: int
    overlay_path: Path
    agent_socket_path: Path
    console_log_path: Path
    base_disk: Path | None = None
    """The overlay's backing file (qcow2); ``None`` means the image's root filesystem."""
    disk_size_mib: int | None = None
    """The overlay's virtual size; ``None`` keeps the base disk's size."""
    memory_file: Path | None = None
    """Back the guest RAM with this file (VM templating): ``memory_shared`` writes it
    through (a template being made), else it is mapped copy-on-write (a capsule
    restored from a template; the file is never modified)."""
    memory_shared: bool = False
    incoming_state: Path | None = None
    """Instead of booting, restore this device state (saved by :meth:`Driver.freeze`
    with the RAM in ``memory_file``) and continue where the template left off."""
    start_paused: bool = False
    """With ``incoming_state``: leave the restored VM paused (a warm pool's spare; :meth:`Driver.resume`)."""
    share_dir: Path | None = None
    """Export this directory to the guest over 9p (a device: a template and its restores agree
    on it). The driver creates it (and its ``hostshare`` subdirectory, where
    :meth:`Driver.share_into` puts a host directory later), owned by QEMU's user."""

    @classmethod
    def in_dir(
        cls, capsule_id: str, directory: Path, *, image: GuestImage, vcpus: int = 1, memory_mib: int = 256
    ) -> VmSpec:
        """A spec whose files live in ``directory`` (``disk.qcow2``, ``agent.sock``, ``console.log``)."""
        return cls(
            capsule_id=capsule_id,
            image=image,
            vcpus=vcpus,
            memory_mib=memory_mib,
            overlay_path=directory / "disk.qcow2",
            agent_socket_path=directory / "agent.sock",
            console_log_path=directory / "console.log",
        )

    @property
    def backing_disk(self) -> Path:
        return self.base_disk if self.base_disk is not None else self.image.rootfs


@dataclass(frozen=True, kw_only=True)
class VmHandle:
    """A VM the driver runs (or ran) for a capsule."""

    capsule_id: str
    name: str
    """The hypervisor's name for it (``dovecote-<capsule id>``)."""
    accel: Accel
    overlay_path: Path
    agent_socket_path: Path
    console_log_path: Path


@dataclass(frozen=True, kw_only=True)
class VmInfo:
    """One entry of :meth:`Driver.list`."""

    handle: VmHandle
    state: VmState


@dataclass(frozen=True, kw_only=True)
class VmStats:
    """One reading of a VM's counters (:meth:`Driver.stats`); rates are the caller's."""

    cpu_time_ns: int
    """CPU time the VM has used since it started, all vCPUs together (cumulative)."""
    vcpus: int
    memory_bytes: int
    """Guest memory in use: what the guest reports if it does, else the VM's resident set."""
    disk_bytes: int
    """Bytes the capsule's overlay occupies on the host (allocated, not its virtual size)."""


class Driver(abc.ABC):
    """Runs capsule VMs on this host. Every method may raise :class:`DriverError`."""

    accel: Accel
    """The accelerator new VMs use."""

    @abc.abstractmethod
    async def create(self, spec: VmSpec) -> VmHandle:
        """Create the capsule's overlay (if missing) and boot a VM from it.

        Returns once the hypervisor runs the VM; the guest is still booting (wait
        for the agent on :attr:`VmHandle.agent_socket_path`).

        Raises:
            VmExists: the capsule already has a VM on this host.
        """

    @abc.abstractmethod
    async def destroy(self, capsule_id: str, *, remove_disk: bool = True) -> None:
        """Stop the VM at once (no guest shutdown) and remove its overlay and agent socket.

        ``remove_disk=False`` keeps the overlay (to copy it into a template, say).
        The console log is left for the caller, who owns the directory.

        Raises:
            VmNotFound: no VM for this capsule.
        """

    @abc.abstractmethod
    async def state(self, capsule_id: str) -> VmState:
        """The VM's state.

        Raises:
            VmNotFound: no VM for this capsule.
        """

    @abc.abstractmethod
    async def list(self) -> builtins.list[VmInfo]:
        """Every Dovecote VM on this host (for reconcile); VMs not ours are left out."""

    @abc.abstractmethod
    async def agent_socket(self, capsule_id: str) -> Path:
        """The host-side unix socket of the VM's guest agent channel.

        Raises:
            VmNotFound: no VM for this capsule.
        """

    @abc.abstractmethod
    async def pause(self, capsule_id: str) -> None:
        """Stop the vCPUs; memory stays allocated (:meth:`resume` continues)."""

    @abc.abstractmethod
    async def resume(self, capsule_id: str) -> None:
        """Continue a VM stopped by :meth:`pause`."""

    @abc.abstractmethod
    async def save(self, capsule_id: str, path: Path) -> None:
        """Write the VM's memory and device state to ``path`` and stop the VM.

        The overlay stays where it is: :meth:`restore` needs it unchanged.

        Raises:
            VmNotFound: no VM for this capsule.
        """

    @abc.abstractmethod
    async def restore(self, path: Path, *, memory_file: Path | None = None,
                      paused: bool = False) -> VmHandle:
        """Run the VM saved in ``path`` again, on its own overlay, where it left off.

        ``memory_file`` puts the restored RAM in that file, written through (to
        :meth:`freeze` it into a template next); ``paused`` leaves the vCPUs
        stopped.

        Raises:
            VmExists: the capsule already has a running VM.
        """

    supports_prestart: bool = False
    """:meth:`prestart` and :meth:`finish_restore` work (else a create restores as usual)."""

    async def prestart(self, spec: VmSpec) -> VmHandle:
        """Start the VM of ``spec``, a template's restore (``spec.incoming_state`` set), ahead
        of time: its disk made, its vCPUs stopped, waiting for the device state, which
        :meth:`finish_restore` loads when a capsule claims it (the warm pool's pre-started VMs).

        Raises:
            VmExists: the capsule already has a running VM.
            DriverError: the driver cannot (this default: see :attr:`supports_prestart`).
        """
        raise DriverError(f"{type(self).__name__} cannot pre-start VMs")

    async def finish_restore(self, capsule_id: str, state: Path) -> None:
        """Load the device state ``state`` into a VM made by :meth:`prestart` and run its
        vCPUs; on failure the VM is destroyed.

        Raises:
            VmNotFound: no VM for this capsule.
            DriverError: the driver cannot (this default), or the state did not load.
        """
        raise DriverError(f"{type(self).__name__} cannot pre-start VMs")

    async def freeze(self, capsule_id: str, state_path: Path) -> None:
        """Stop the vCPUs and write the device state (not the RAM) to ``state_path``.

        Only meaningful for a VM whose RAM is a shared ``memory_file``: the
        file and the state together are a template. The VM stays stopped;
        destroy it (or :meth:`resume` it) next.

        Raises:
            DriverError: the driver cannot do this.
        """
        raise DriverError(f"{type(self).__name__} cannot freeze VMs into templates")

    async def screenshot(self, capsule_id: str) -> bytes:
        """The VM's display now, as PNG, taken by the hypervisor (no guest agent involved).

        Raises:
            VmNotFound: no VM for this capsule.
            DriverError: the driver cannot (this default) or the VM has no display.
        """
        raise DriverError(f"{type(self).__name__} cannot take screenshots")

    async def display_socket(self, capsule_id: str) -> Path | None:
        """The host-side unix socket of the VM's display (its VNC server), or None when the
        VM has none (started without one, or a driver that runs no displays: this default).

        Raises:
            VmNotFound: no VM for this capsule.
        """
        return None

    async def share_into(self, capsule_id: str, host_dir: Path) -> None:
        """Show ``host_dir`` in the running VM's 9p share as ``hostshare`` (the VM was created
        with a ``share_dir``); the guest sees it under its mount of :data:`SHARE_TAG`.

        Raises:
            VmNotFound: no VM for this capsule.
            DriverError: the driver cannot (this default), or the VM has no share.
        """
        raise DriverError(f"{type(self).__name__} cannot share host directories")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release the driver's connection; the VMs keep running."""

    async def stats(self, capsule_id: str) -> VmStats:
        """The VM's counters now (cheap: vmmgr's sampler calls it twice a second per VM).

        Raises:
            VmNotFound: no VM for this capsule.
            DriverError: the driver cannot tell (this default); the capsule goes unsampled.
        """
        raise DriverError(f"{type(self).__name__} cannot report VM statistics")
