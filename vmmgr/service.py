"""The vmmgr service: runs on every host and drives its capsule VMs (libvirt/QEMU).

This is the service's process entry: ``dovecote vmmgr`` runs :data:`SPEC`.

It registers as ``vmmgr`` (placement: any host may take a new capsule) and as
``vmmgr.<host_id>`` (operations on a capsule go to the host that runs it);
the handlers are in :mod:`dovecote.vmmgr.capsules`.

Start-up does not wait for the hypervisor: the service answers the bus at
once, and a background task gets the guest image (built on first start,
which takes minutes; ``/healthz`` shows ``image: building`` meanwhile and
creates are refused with 503 ``image_not_ready``), chooses the accelerator,
connects the driver, reaps what killed builds left in the image cache
(:mod:`dovecote.vmmgr.leftovers`), reconciles libvirt's domains with the records
(:mod:`dovecote.vmmgr.reconcile`), then resumes the capsules its last stop
paused. Its stop pauses every running capsule (memory to disk) unless
``DOVECOTE_VM_KEEP_RUNNING`` is set, within ``DOVECOTE_VM_STOP_TIMEOUT_S``
(:mod:`dovecote.vmmgr.shutdown`).

``DOVECOTE_VM_DRIVER`` picks the driver: ``auto`` (the default) is ``libvirt``
when libvirtd's socket is on this machine, else ``none``; ``libvirt``
(:mod:`dovecote.vmmgr.libvirt_driver`) and ``cloud-hypervisor``
(:mod:`dovecote.vmmgr.ch_driver`) run VMs; ``none`` (no hypervisor: no image is
built) refuses creates with 503 ``vm_driver_disabled``.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import trio

from dovecote.bus.messages.capsules import CapsuleSpec
from dovecote.libs.config import BaseConfig
from dovecote.libs.logs import get_logger
from dovecote.libs.runtime import ServiceContext, ServiceSpec
from dovecote.vmmgr import placement
from dovecote.vmmgr.builds import Builds
from dovecote.vmmgr.capsules import Capsules, CapsuleSettings, Machines
from dovecote.vmmgr.disks import serve_disk_usage
from dovecote.vmmgr.driver import Driver
from dovecote.vmmgr.hostlink import HostLink
from dovecote.vmmgr.reconcile import reconcile
from dovecote.vmmgr.sampler import Sampler
from dovecote.vmmgr.shutdown import pause_for_shutdown, resume_after_shutdown
from dovecote.vmmgr.snapshots import Snapshots
from dovecote.vmmgr.streams import CapsuleStreams

log = get_logger("dovecote.vmmgr")

Positive = Annotated[int, msgspec.Meta(ge=1)]


LIBVIRT_SOCKET = "/var/run/libvirt/libvirt-sock"


class VmmgrConfig(BaseConfig, kw_only=True):
    """Settings of the vmmgr service (``DOVECOTE_*`` variables)."""

    vm_driver: Literal["auto", "libvirt", "cloud-hypervisor", "none"] = "auto"
    """``auto``: libvirt when its daemon is running here, else no VMs (creates answer 503)."""
    libvirt_uri: str = "qemu:///system"
    ch_binary: str = "cloud-hypervisor"
    """The Cloud Hypervisor binary (``DOVECOTE_CH_BINARY``) for ``vm_driver=cloud-hypervisor``."""
    vm_image_dir: str = ""
    """Guest image cache (``DOVECOTE_VM_IMAGE_DIR``); default: one per machine, shared by
    every data directory (``/var/tmp/dovecote/images`` as root, else ``~/.cache``)."""
    vm_run_dir: str = ""
    """Per-capsule files (``DOVECOTE_VM_RUN_DIR``); default ``<data_dir>/capsules``."""
    vm_boot_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    vm_agent_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    capsule_max_vcpus: Positive = 8
    capsule_max_memory_mb: Positive = 16384
    capsule_max_disk_mb: Positive = 5120
    team_max_capsules: Positive = 10
    team_max_vcpus: Positive = 16
    team_max_memory_mb: Positive = 32768
    host_max_capsules: Annotated[int, msgspec.Meta(ge=0)] = 0
    host_max_memory_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    vm_netguard: bool = True
    """Reject capsule traffic to this host and private networks (nftables; ``DOVECOTE_VM_NETGUARD``)."""
    host_heartbeat_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """How often this host tells auth it is alive (``DOVECOTE_HOST_HEARTBEAT_S``); keep it
    well under auth's ``DOVECOTE_HOST_SILENCE_S``."""
    host_lost_after_s: Annotated[float, msgspec.Meta(gt=0)] = 86400.0
    """How long a silent host's capsules wait for it before they are ``missing``
    (``DOVECOTE_HOST_LOST_AFTER_S``; a returning host still re-adopts what survived)."""
    vm_nft_binary: str = "nft"
    """The ``nft`` command the guard runs (``DOVECOTE_VM_NFT_BINARY``; a name on PATH or a path)."""
    vm_pool_size: Annotated[int, msgspec.Meta(ge=0, le=64)] = 1
    """Paused spare VMs of the default ``minimal`` shape kept ready (``DOVECOTE_VM_POOL_SIZE``)."""
    vm_prestarted: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    """QEMUs of the ``minimal`` shape started ahead of time, waiting for the template's state:
    a create without a warm spare claims one (``DOVECOTE_VM_PRESTARTED``; see ``vmmgr/pool.py``)."""
    vm_team_spares: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    """Spares of teams' often-used snapshot templates kept on this host, in all
    (``DOVECOTE_VM_TEAM_SPARES``; 0: none; see ``vmmgr/pool.py``)."""
    vm_team_spares_per_team: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    """Of those, at most this many for one team (``DOVECOTE_VM_TEAM_SPARES_PER_TEAM``)."""
    vm_templates: bool = True
    """Create ``minimal`` capsules by restoring a frozen VM (``DOVECOTE_VM_TEMPLATES``); else cold-boot."""
    desktop_template: bool = False
    """Build the desktop template (``vmmgr/desktop.py``) at start (``DOVECOTE_DESKTOP_TEMPLATE``);
    else the first desktop session's request builds it."""
    browser_template: bool = False
    """Build the browser template (``vmmgr/browser.py``) at start (``DOVECOTE_BROWSER_TEMPLATE``);
    else the first browser session's request builds it."""
    vm_keep_running: bool = False
    """Leave capsules running when vmmgr stops (``DOVECOTE_VM_KEEP_RUNNING``, ``dovecote up
    --keep-running``); by default they are paused and resumed at the next start."""
    vm_stop_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 120.0
    """How long vmmgr's stop may spend pausing capsules (``DOVECOTE_VM_STOP_TIMEOUT_S``)."""

    def stop_grace_s(self) -> float:
        """The whole stop's budget: in-flight requests' grace, plus the capsules' pauses."""
        return self.shutdown_grace_s + (0.0 if self.vm_keep_running else self.vm_stop_timeout_s)

    def image_dir(self) -> Path:
        if self.vm_image_dir:
            return Path(self.vm_image_dir)
        if os.geteuid() == 0:
            return Path("/var/tmp/dovecote/images")
        return Path.home() / ".cache" / "dovecote" / "images"

    def driver(self) -> str:
        """The driver to use: ``auto`` resolved against this machine."""
        if self.vm_driver != "auto":
            return self.vm_driver
        return "libvirt" if Path(LIBVIRT_SOCKET).exists() else "none"

    def run_dir(self) -> Path:
        return Path(self.vm_run_dir) if self.vm_run_dir else Path(self.data_dir) / "capsules"

    def limits(self) -> placement.Limits:
        return placement.Limits(
            max_vcpus=self.capsule_max_vcpus, max_memory_mb=self.capsule_max_memory_mb,
            max_disk_size_mb=self.capsule_max_disk_mb, team_max_capsules=self.team_max_capsules,
            team_max_vcpus=self.team_max_vcpus, team_max_memory_mb=self.team_max_memory_mb)


async def main(ctx: ServiceContext[VmmgrConfig], *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Register the capsule handlers, then bring the hypervisor up in the background."""
    config = ctx.config
    assert ctx.db is not None
    machines = Machines()
    capsules = Capsules(
        db=ctx.db, publish=ctx.bus.publish, machines=machines, nursery=ctx.nursery,
        request=ctx.bus.request,
        settings=CapsuleSettings(
            host_id=config.host_id, run_dir=config.run_dir().resolve(), limits=config.limits(),
            boot_timeout_s=config.vm_boot_timeout_s, agent_timeout_s=config.vm_agent_timeout_s,
            host_max_capsules=config.host_max_capsules, host_max_memory_mb=config.host_max_memory_mb,
            template_dir=(Path(config.data_dir) / "templates").resolve()))
    capsules.register(ctx.handle)
    capsules.events.nudge()  # events a previous vmmgr staged and did not send
    snapshots = Snapshots(capsules)
    snapshots.register(ctx.handle)
    builds = Builds(capsules, snapshots)
    builds.register(ctx.handle)
    await builds.fail_interrupted()
    await ctx.nursery.start(snapshots.watch_ttl)
    CapsuleStreams(capsules).register(ctx.handle_stream)
    from dovecote.vmmgr.agent_relay import AgentRelays  # capsule-bound agent sessions (issue 15)

    AgentRelays(ops=capsules.ops, request=ctx.bus.request, nursery=ctx.nursery).register(ctx.handle)
    from dovecote.vmmgr.vnc import LiveView  # the live desktop view (issue 13)

    LiveView(capsules).register(ctx.handle, ctx.handle_stream)
    from dovecote.vmmgr.desktop import DesktopTemplates  # desktop sessions (issue 12)

    desktop = DesktopTemplates(capsules, image_dir=lambda: config.image_dir().resolve(),
                               health=ctx.health_details)
    desktop.register(ctx.handle)
    if config.desktop_template:
        ctx.nursery.start_soon(desktop.build_when_ready)
    from dovecote.vmmgr.browser import BrowserTemplates, TcpStreams  # browser sessions (issue 14)

    browser = BrowserTemplates(capsules, image_dir=lambda: config.image_dir().resolve(),
                               health=ctx.health_details)
    browser.register(ctx.handle)
    TcpStreams(capsules).register(ctx.handle_stream)
    if config.browser_template:
        ctx.nursery.start_soon(browser.build_when_ready)
    sampler = Sampler(db=ctx.db, host_id=config.host_id, machines=machines,
                      send=lambda batch: ctx.bus.request("metrics", batch, timeout=10.0))
    sampler.register(ctx.handle)
    await ctx.nursery.start(sampler.serve)
    await ctx.nursery.start(serve_disk_usage, capsules)
    link = HostLink(ctx, capsules)
    link.register()
    await ctx.nursery.start(link.serve)
    bring_up = _BringUp()
    async with AsyncExitStack() as stack:
        driver = config.driver()
        if driver == "none":
            machines.status = ("disabled: libvirtd is not running (infra/start-libvirt.sh)"
                               if config.vm_driver == "auto" else "disabled")
        else:
            ctx.nursery.start_soon(_bring_up, ctx, machines, capsules, snapshots, stack, bring_up)
        ctx.health_details["image"] = machines.status
        ctx.health_details["driver"] = driver
        task_status.started()
        while not ctx.stopping.is_set():  # keep the health details current
            ctx.health_details["image"] = machines.status
            ctx.health_details.update({k: str(v) for k, v in capsules.statistics().items()})
            with trio.move_on_after(1):
                await ctx.stopping.wait()
        # Capsules outlive vmmgr (libvirt keeps them); the pool's spares have no
        # record, so they go now, while the driver is still connected.
        if capsules.pool is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(config.shutdown_grace_s / 2):
                await capsules.pool.close()
        # Capsules are paused (memory to disk) and resumed at the next start
        # (dovecote.vmmgr.shutdown), unless the operator wants them left running.
        if config.vm_keep_running:
            log.info("capsules are left running (DOVECOTE_VM_KEEP_RUNNING)")
        else:
            await pause_for_shutdown(capsules, snapshots, timeout_s=config.vm_stop_timeout_s)
        # A template build in progress destroys its VM while the driver is connected.
        await desktop.stop(timeout_s=config.shutdown_grace_s)
        await browser.stop(timeout_s=config.shutdown_grace_s)
        await bring_up.stop(timeout_s=config.shutdown_grace_s)
        await capsules.close_events(timeout_s=min(5.0, config.shutdown_grace_s))


class _BringUp:
    """The bring-up task's cancel scope, so that the stop ends it before the driver closes."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def stop(self, *, timeout_s: float) -> None:
        self.scope.cancel()
        with trio.move_on_after(timeout_s):
            await self.done.wait()


async def _bring_up(ctx: ServiceContext[VmmgrConfig], machines: Machines, capsules: Capsules,
                    snapshots: Snapshots, stack: AsyncExitStack, task: _BringUp) -> None:
    """Image, accelerator, driver, reconcile, resumes; ``machines.status`` tells how far it got."""
    try:
        with task.scope:
            await _bring_up_steps(ctx, machines, capsules, snapshots, stack)
    finally:
        task.done.set()


async def _bring_up_steps(ctx: ServiceContext[VmmgrConfig], machines: Machines, capsules: Capsules,
                          snapshots: Snapshots, stack: AsyncExitStack) -> None:
    from dovecote.vmmgr import accel as accel_mod
    from dovecote.vmmgr.images import ensure_guest_image

    config = ctx.config
    try:
        image_dir = config.image_dir().resolve()
        await trio.to_thread.run_sync(lambda: image_dir.mkdir(parents=True, exist_ok=True))
        await trio.to_thread.run_sync(capsules.settings.run_dir.mkdir, 0o755, True, True)
        machines.status = "building"
        log.info("getting the guest image", extra={"image_dir": str(image_dir)})
        image = await ensure_guest_image(  # each step of a build shows in /healthz (dovecote up prints it)
            image_dir, on_progress=lambda step: ctx.health_details.__setitem__("image_step", step))
        ctx.health_details.pop("image_step", None)
        chosen = await accel_mod.choose_accel(
            probe=lambda: accel_mod.probe_kvm(image.kernel, image.initrd),
            key=accel_mod.probe_key(image_id=image.image_id),
            cache_file=image_dir / "accel.json")
        if config.driver() == "cloud-hypervisor":
            # Cloud Hypervisor: KVM only, no templates (its restore is per VM), no
            # user-mode networking (capsules get no network yet).
            from dovecote.vmmgr.ch_driver import open_ch_driver

            driver: Driver = await stack.enter_async_context(open_ch_driver(
                capsules.settings.run_dir, accel=chosen, nursery=ctx.nursery, binary=config.ch_binary))
            templates = False
        else:
            from dovecote.vmmgr.emulator import install_wrapper
            from dovecote.vmmgr.libvirt_driver import open_libvirt_driver

            emulator = await trio.to_thread.run_sync(install_wrapper, image_dir)
            libvirt_driver = await stack.enter_async_context(
                open_libvirt_driver(config.libvirt_uri, accel=chosen, emulator=emulator))
            guard, machines.isolation_error = await _guard_network(config, libvirt_driver.qemu_owner)
            ctx.health_details["netguard"] = guard
            from dovecote.vmmgr.confinement import health_details as confinement

            ctx.health_details.update(await trio.to_thread.run_sync(
                confinement, libvirt_driver.qemu_owner))
            driver = libvirt_driver
            templates = config.vm_templates
        try:  # before this process builds anything: what killed builds left (vmmgr/leftovers.py)
            from dovecote.vmmgr.leftovers import reap_stale_builds

            await reap_stale_builds(driver, image_dir)
        except Exception:
            log.warning("could not reap what killed builds left", exc_info=True)
        base_size = await _virtual_size_mib(image.rootfs)
        ctx.health_details["accel"] = str(chosen)
        if templates:  # said before "image: ready", so that nobody takes the image alone for ready
            ctx.health_details["template"] = "waiting"
        machines.set_ready(driver, image, base_size)
        ctx.health_details["image"] = machines.status
        log.info("VMs ready", extra={"image": image.image_id, "accel": str(chosen)})
        await reconcile(capsules)
        try:
            await resume_after_shutdown(capsules, snapshots)
        except Exception:  # the capsules stay paused, marked: the next start tries again
            log.exception("could not resume the capsules paused by the last stop")
        if templates:
            from dovecote.vmmgr.templates import ensure_minimal

            ctx.health_details["template"] = "building"
            default_disk = min(CapsuleSpec().disk_size_mb, config.capsule_max_disk_mb)
            capsules.minimal = await ensure_minimal(
                driver, image, image_dir, boot_timeout_s=config.vm_boot_timeout_s,
                disk_size_mib=default_disk if base_size is None or default_disk >= base_size else None)
            ctx.health_details["template"] = "ready"
            if ((config.vm_pool_size or config.vm_team_spares or config.vm_prestarted)
                    and machines.isolation_error is None):
                from dovecote.vmmgr.pool import WarmPool

                pool = WarmPool(capsules, config.vm_pool_size,
                                disk_size_mb=min(CapsuleSpec().disk_size_mb, config.capsule_max_disk_mb),
                                team_size=config.vm_team_spares,
                                team_max=config.vm_team_spares_per_team,
                                prestarted=config.vm_prestarted)
                capsules.pool = pool
                await ctx.nursery.start(pool.run)
            log.info("capsules are created from the built-in template")
    except Exception as exc:
        machines.status = f"failed: {exc}"[:300]
        ctx.health_details["image"] = machines.status
        log.exception("the VM driver could not start")


async def _guard_network(config: VmmgrConfig, qemu_owner: tuple[int, int] | None
                         ) -> tuple[str, str | None]:
    """Install the capsule egress rules (:mod:`dovecote.vmmgr.netguard`).

    Returns the ``netguard`` health detail and, when the guard is wanted but
    could not be installed, the reason capsules are refused (fail closed).
    """
    from dovecote.vmmgr import netguard

    if not config.vm_netguard:
        log.warning("the capsule network guard is off (DOVECOTE_VM_NETGUARD=false): "
                    "capsules can reach this host's services and private networks")
        return "off: DOVECOTE_VM_NETGUARD=false (capsules can reach the host)", None
    uid = qemu_owner[0] if qemu_owner is not None else None
    if uid is None:
        reason = "QEMU's user is unknown"
    elif uid == 0:  # the guard matches QEMU's uid: root's would be the host's own traffic
        reason = "libvirt runs QEMU as root (set user/group in /etc/libvirt/qemu.conf)"
    elif os.geteuid() != 0:
        reason = "vmmgr is not root"
    else:
        try:
            await trio.to_thread.run_sync(lambda: netguard.install(uid, nft=config.vm_nft_binary))
            return "on", None
        except (netguard.NetguardError, OSError, subprocess.SubprocessError) as exc:
            reason = str(exc) or repr(exc)
    log.error("the capsule network guard could not be installed; capsules are refused",
              extra={"reason": reason})
    return f"failed: {reason} (capsules are refused)"[:300], reason[:300]


async def _virtual_size_mib(disk: Path) -> int | None:
    result = await trio.run_process(["qemu-img", "info", "--output=json", str(disk)],
                                    stdin=subprocess.DEVNULL, capture_stdout=True,
                                    capture_stderr=True, check=False)
    if result.returncode != 0:
        return None
    try:
        return -(-int(json.loads(result.stdout)["virtual-size"]) // (1024 * 1024))
    except (ValueError, KeyError, TypeError):
        return None


SPEC: ServiceSpec[VmmgrConfig] = ServiceSpec(
    name="vmmgr",
    config_cls=VmmgrConfig,
    main=main,
    schema="vmmgr",
    migrations="dovecote.vmmgr:migrations",
    # Placement goes to any host ("vmmgr"); operations on a capsule go to the
    # host that runs it ("vmmgr.<host_id>").
    extra_names=lambda config: [f"vmmgr.{config.host_id}"],
    # Its stop pauses the capsules (dovecote.vmmgr.shutdown): longer than other services'.
    stop_grace_s=VmmgrConfig.stop_grace_s,
)
