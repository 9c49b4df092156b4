"""Templates: frozen VMs that capsules are restored from (VM templating).

A template is three files in one directory:

``disk.qcow2``
    the guest's disk at the moment it was frozen (a qcow2 whose backing file is
    the guest image's read-only base, so only what the guest changed is stored);
``memory``
    the guest's RAM, byte for byte (a sparse file: pages never touched take no space);
``state``
    the device state (CPU registers, virtio queues...), saved with QEMU's
    ``x-ignore-shared`` migration capability, so it holds no RAM (about 0.5 MB).

A capsule created from a template gets a fresh copy-on-write overlay over
``disk.qcow2``, maps ``memory`` copy-on-write (``share=off``: pages are read
from the file on first touch and the template is never written) and restores
``state`` (see :mod:`dovecote.vmmgr.emulator` and
:meth:`dovecote.vmmgr.driver.Driver.freeze`). Nothing is copied, so creating
from a template costs the time to start QEMU, not a boot. The same vCPU count
and memory size are required: a capsule from a template has the template's.

The built-in ``minimal`` template is made on every host from the guest image
(cold boot, wait for the agent, freeze) for the reference's default size (1
vCPU, 512 MB) and cached with the image (``<image dir>/templates/``); a
``minimal`` capsule of another size cold-boots. Team snapshots (``POST
/v1/snapshots``) live in ``<data dir>/templates/<id>/`` on the host of the
source capsule, recorded in the ``templates`` table.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from dovecote.libs.logs import get_logger
from dovecote.vmmgr.driver import Driver, DriverError, VmSpec
from dovecote.vmmgr.guest import open_agent
from dovecote.vmmgr.images import GuestImage

log = get_logger("dovecote.vmmgr.templates")

MINIMAL = "minimal"
MINIMAL_VCPUS = 1
MINIMAL_MEMORY_MB = 512
DESKTOP = "desktop"
"""The desktop template: the desktop image (``infra/guest/desktop.py``) booted into X and frozen."""
DESKTOP_VCPUS = 2
DESKTOP_MEMORY_MB = 2048
DESKTOP_READY = (
    # X answers, openbox manages the screen, and the programs sessions open first are in the
    # page cache (frozen with it: a session's first open_app does not read them from disk).
    "test -e /run/dovecote-desktop.ready && xdpyinfo >/dev/null && "
    "xprop -root _NET_SUPPORTING_WM_CHECK | grep -q 'window id' && "
    "{ mousepad --version >/dev/null 2>&1; xterm -version >/dev/null 2>&1; true; } && "
    "xdotool version >/dev/null && xrandr >/dev/null"
)
DESKTOP_SIZE = "1440x900"
"""The frozen desktop's screen: the reference's default session size (a default session
needs no mode switch after the restore; another size is set with xrandr)."""
DESKTOP_PREPARE = f"{DESKTOP_READY} && {{ xrandr -s {DESKTOP_SIZE} >/dev/null 2>&1; true; }}"
FILES = ("disk.qcow2", "memory", "state")
BUILD_SUFFIX = ".build"
"""A template is built in ``<its directory>.build`` (renamed into place when frozen), under
the lock ``<its directory>.lock``; :mod:`dovecote.vmmgr.leftovers` reaps a build whose
lock nobody holds (its builder was killed)."""
BUILDER_PREFIX = "tmpl-"
"""The capsule id (domain ``dovecote-tmpl-<hex>``) of a template's builder VM."""


@dataclass(frozen=True, kw_only=True)
class TemplateFiles:
    """Where a template's files are, and the VM shape they need."""

    directory: Path
    vcpus: int
    memory_mb: int
    image: GuestImage | None = None
    """The guest image the template was made from, when it is not the host's capsule image
    (the desktop template): a capsule restored from it runs that image's kernel and devices."""
    share: bool = False
    """The template's VM has a 9p share device (the desktop template): a capsule restored
    from it has one too, exporting ``share/`` of its own directory (see
    :meth:`dovecote.vmmgr.driver.Driver.share_into`)."""

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def memory(self) -> Path:
        return self.directory / "memory"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    def complete(self) -> bool:
        return all((self.directory / name).exists() for name in FILES)

    def restore_spec(self, spec: VmSpec) -> VmSpec:
        """``spec`` (a capsule's) as a restore of this template.

        The overlay keeps the template disk's size: the restored guest knows its
        disk as it was frozen (a smaller overlay would cut its filesystem short).
        """
        return replace(spec, base_disk=self.disk, memory_file=self.memory, incoming_state=self.state,
                       disk_size_mib=None, image=self.image or spec.image,
                       share_dir=spec.overlay_path.parent / "share" if self.share else None)


def disk_usage(directory: Path) -> int:
    """Bytes the files of ``directory`` occupy on disk (sparse files count what is allocated)."""
    total = 0
    for path in directory.rglob("*"):
        if path.is_file():
            total += path.stat().st_blocks * 512
    return total


async def flatten_disk(overlay: Path, base: Path, target: Path) -> None:
    """Copy ``overlay``'s whole chain into ``target``, a qcow2 over ``base`` holding only what differs."""
    result = await trio.run_process(
        ["qemu-img", "convert", "-U", "-O", "qcow2", "-B", str(base), "-F", "qcow2",
         str(overlay), str(target)],
        stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise DriverError(f"qemu-img convert failed: {result.stderr.decode(errors='replace').strip()}")


def minimal_dir(image_dir: Path, image: GuestImage, accel: str, vcpus: int, memory_mb: int,
                disk_size_mib: int | None = None) -> Path:
    """The cache directory of the built-in template for this image, accelerator and shape."""
    disk = f"-{disk_size_mib}M" if disk_size_mib is not None else ""
    return image_dir / "templates" / f"{MINIMAL}-{image.image_id[:16]}-{accel}-{vcpus}x{memory_mb}{disk}"


async def ensure_minimal(driver: Driver, image: GuestImage, image_dir: Path, *,
                         boot_timeout_s: float = 300.0,
                         disk_size_mib: int | None = None) -> TemplateFiles:
    """The built-in template, made now (cold boot, freeze) unless cached.

    Its disk is ``disk_size_mib`` (default: the image's), the size of every
    capsule restored from it: the guest grows its filesystem to the disk at boot.
    Several installations may share the image directory: a lock file makes one
    of them build, the others wait and reuse.
    """
    directory = minimal_dir(image_dir, image, str(driver.accel), MINIMAL_VCPUS, MINIMAL_MEMORY_MB,
                            disk_size_mib)
    files = TemplateFiles(directory=directory, vcpus=MINIMAL_VCPUS, memory_mb=MINIMAL_MEMORY_MB)
    return await _ensure_built(files, _build_minimal(driver, image, files, boot_timeout_s, disk_size_mib))


async def _ensure_built(files: TemplateFiles, build: Coroutine[Any, Any, None]) -> TemplateFiles:
    """``files``, built by ``build`` unless already complete, under a lock file next to the
    template's directory (several installations may share the image directory: one builds,
    the others wait and reuse). ``build`` is closed unawaited when nothing is to be built."""
    try:
        if files.complete():
            return files
        directory = files.directory
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.parent.chmod(0o755)
        lock_fd = await trio.to_thread.run_sync(_lock, build_lock(directory))
        try:
            if not files.complete():
                await build
            return files
        finally:
            os.close(lock_fd)
    finally:
        build.close()


def build_lock(directory: Path) -> Path:
    """The lock file held while the template of ``directory`` is built."""
    return directory.with_name(directory.name + ".lock")


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def _build_minimal(driver: Driver, image: GuestImage, files: TemplateFiles,
                         boot_timeout_s: float, disk_size_mib: int | None = None, *,
                         ready: str | None = None, name: str = MINIMAL) -> None:
    """Cold-boot ``image``, wait for its agent (and ``ready``), freeze it into ``files``."""
    began = time.monotonic()
    work = files.directory.with_name(files.directory.name + BUILD_SUFFIX)
    await trio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
    work.mkdir(parents=True)
    work.chmod(0o755)
    builder_id = BUILDER_PREFIX + os.urandom(6).hex()
    spec = VmSpec(capsule_id=builder_id, image=image, vcpus=files.vcpus, memory_mib=files.memory_mb,
                  overlay_path=work / "disk.qcow2", agent_socket_path=work / "agent.sock",
                  console_log_path=work / "console.log", memory_file=work / "memory",
                  memory_shared=True, disk_size_mib=disk_size_mib,
                  share_dir=work / "share" if files.share else None)
    await driver.create(spec)
    try:
        with trio.fail_after(boot_timeout_s):
            # Freeze while the host is connected: a restored guest finds its agent
            # mid-session and is served as soon as the new host end connects.
            async with open_agent(str(spec.agent_socket_path), connect_timeout=boot_timeout_s) as agent:
                while ready is not None:  # bounded by fail_after above
                    result = await agent.exec(["sh", "-c", ready], timeout=120)
                    if result.exit_code == 0:
                        break
                    await trio.sleep(1)
                await agent.exec("sync", timeout=60)
                await driver.freeze(builder_id, work / "state")
    finally:
        with trio.CancelScope(shield=True):
            try:
                await driver.destroy(builder_id, remove_disk=False)
            except DriverError:
                log.warning("could not destroy the template builder VM", exc_info=True)
    for leftover in ("agent.sock", "console.log"):
        (work / leftover).unlink(missing_ok=True)
    shutil.rmtree(work / "share", ignore_errors=True)
    os.replace(work, files.directory)
    log.info("built-in template ready", extra={"template": name, "dir": str(files.directory),
                                               "build_s": round(time.monotonic() - began, 1)})


def desktop_dir(image_dir: Path, image: GuestImage, accel: str) -> Path:
    """The cache directory of the desktop template for this (desktop) image and accelerator."""
    return (image_dir / "templates"
            / (f"{DESKTOP}-{image.image_id[:16]}-{accel}-{DESKTOP_VCPUS}x{DESKTOP_MEMORY_MB}"
               f"-{DESKTOP_SIZE}-9p"))


async def ensure_desktop(driver: Driver, image: GuestImage, image_dir: Path, *,
                         boot_timeout_s: float = 900.0) -> TemplateFiles:
    """The desktop template, made now unless cached: the desktop image cold-booted until its
    desktop is up (:data:`DESKTOP_READY`, through the agent), then frozen like ``minimal``.

    A capsule restored from it runs ``image`` (:attr:`TemplateFiles.image`), whatever the
    host's capsule image. Built under the same kind of lock as :func:`ensure_minimal`.
    """
    directory = desktop_dir(image_dir, image, str(driver.accel))
    files = TemplateFiles(directory=directory, vcpus=DESKTOP_VCPUS, memory_mb=DESKTOP_MEMORY_MB,
                          image=image, share=True)
    return await _ensure_built(files, _build_minimal(driver, image, files, boot_timeout_s,
                                                     ready=DESKTOP_PREPARE, name=DESKTOP))


BROWSER = "browser"
"""The browser template: the desktop image booted with headless Chromium already running, its
DevTools endpoint on the guest's loopback only (:data:`BROWSER_CDP_PORT`), then frozen."""
BROWSER_VCPUS = 2
BROWSER_MEMORY_MB = 2048
BROWSER_CDP_PORT = 9222
"""Chromium's DevTools port in a browser capsule (``127.0.0.1`` of the guest; reached only
through the guest agent's TCP relay)."""
BROWSER_PROFILE = "/home/dove/.dovecote-browser"
CHROMIUM_FLAGS = (
    "--headless=new --no-sandbox --remote-debugging-address=127.0.0.1 "
    f"--remote-debugging-port={BROWSER_CDP_PORT} --user-data-dir={BROWSER_PROFILE} "
    "--no-first-run --no-default-browser-check --disable-gpu --disable-dev-shm-usage "
    "--disable-background-networking --disable-component-update --disable-sync --mute-audio "
    "--hide-scrollbars --password-store=basic --window-size=1280,800 about:blank"
)
"""``--no-sandbox``: the VM is the sandbox (the guest has no other tenant)."""


def chromium_start(port: int = BROWSER_CDP_PORT, profile: str = BROWSER_PROFILE) -> str:
    """Shell (as the desktop user): start headless Chromium detached, unless it already runs
    on ``port``. Used by the template build and by the cold-start benchmark."""
    flags = CHROMIUM_FLAGS.replace(str(BROWSER_CDP_PORT), str(port)).replace(BROWSER_PROFILE, profile)
    return (f"curl -sf -o /dev/null http://127.0.0.1:{port}/json/version || {{ "
            "C=/usr/lib/chromium/chromium; [ -x $C ] || C=chromium; "
            f"setsid $C {flags} </dev/null >/tmp/chromium-{port}.log 2>&1 & }}")


def chromium_ready(port: int = BROWSER_CDP_PORT) -> str:
    """Shell: Chromium's DevTools answers on ``port`` and it has a page."""
    return (f"curl -sf http://127.0.0.1:{port}/json/version >/dev/null && "
            f"curl -sf http://127.0.0.1:{port}/json/list | grep -q '\"type\": \"page\"'")


BROWSER_PREPARE = f"{chromium_start()}; sleep 1; {chromium_ready()}"


def browser_dir(image_dir: Path, image: GuestImage, accel: str) -> Path:
    """The cache directory of the browser template for this (desktop) image and accelerator."""
    flags = hashlib.sha256(CHROMIUM_FLAGS.encode()).hexdigest()[:8]
    return (image_dir / "templates"
            / f"{BROWSER}-{image.image_id[:16]}-{accel}-{BROWSER_VCPUS}x{BROWSER_MEMORY_MB}-{flags}")


async def ensure_browser(driver: Driver, image: GuestImage, image_dir: Path, *,
                         boot_timeout_s: float = 900.0) -> TemplateFiles:
    """The browser template, made now unless cached: the desktop image cold-booted, headless
    Chromium started and answering on its DevTools port (:data:`BROWSER_PREPARE`, through
    the agent), then frozen like ``minimal``. A browser session is then a restore with a
    browser already up, not a Chromium cold start."""
    directory = browser_dir(image_dir, image, str(driver.accel))
    files = TemplateFiles(directory=directory, vcpus=BROWSER_VCPUS, memory_mb=BROWSER_MEMORY_MB,
                          image=image)
    return await _ensure_built(files, _build_minimal(driver, image, files, boot_timeout_s,
                                                     ready=BROWSER_PREPARE, name=BROWSER))
