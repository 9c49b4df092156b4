"""Reap what killed builds left in the image cache, once, when vmmgr's driver is up.

A template build (:func:`dovecote.vmmgr.templates.ensure_minimal` and its desktop and
browser twins) boots a builder VM (domain ``dovecote-tmpl-<hex>``) whose files live in
``<image dir>/templates/<template>.build/`` and renames that directory into place when
the VM is frozen; a guest image build (``infra/guest/build.py``) works in
``<image dir>/.build-[desktop-]<hash>-<random>/``. Killed by SIGTERM or SIGKILL (or a
crash), a build leaves its directory behind, and a builder VM too: libvirt owns it, and
nothing else ever destroys it (reconcile judges only the capsules' VMs, under the run
directory).

Each build holds a lock file for as long as it runs (``<template>.lock`` next to its
directory; ``.guest-<hash>.lock`` or ``.desktop-<hash>.lock`` for an image), and several
vmmgrs (installations) may share one image cache. The rule is therefore the lock, not
an age:

==========================================  ============================================
what it finds                               what it does
==========================================  ============================================
a ``*.build`` template directory, or a      take its lock without waiting; if taken:
builder VM whose files are in one (the      destroy the builder VMs, remove the
directory may be gone: a later build        directory, then let the lock go (a build
replaced it)                                waiting for it starts afresh, as it does)
the same, its lock held                     a build runs (in this vmmgr or another):
                                            left alone
an image build's ``.build-*`` directory     the same rule with the image's lock
a directory with a mount point under it     left alone (never delete through a mount)
==========================================  ============================================

:func:`reap_stale_builds` is called by vmmgr's bring-up (:mod:`dovecote.vmmgr.service`)
right after its driver connects, before reconcile and before any build of this process.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dovecote.libs.logs import get_logger
from dovecote.vmmgr.driver import Driver, DriverError, VmInfo
from dovecote.vmmgr.filelock import try_lock
from dovecote.vmmgr.templates import BUILD_SUFFIX, BUILDER_PREFIX, build_lock

log = get_logger("dovecote.vmmgr.leftovers")

IMAGE_BUILD_RE = re.compile(r"\.build-(?:(?P<kind>desktop)-)?(?P<hash>[0-9a-f]{16})-.+")
"""An image build's work directory (``tempfile.mkdtemp`` in ``infra/guest/build.py`` and
``infra/guest/desktop.py``); its lock is ``.<kind>-<hash>.lock``, the kind ``guest``
unless named."""


@dataclass
class Reaped:
    """What :func:`reap_stale_builds` removed, and what it left to a build in progress."""

    vms: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)


def _mount_points() -> list[Path]:
    """Every mount point of this process's namespace (blocking)."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4:  # octal escapes: \040 is a space
                points.append(Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])))
    return points


def _has_mount(directory: Path, mounts: list[Path]) -> bool:
    return any(point == directory or directory in point.parents for point in mounts)


def _image_lock(work: Path) -> Path | None:
    found = IMAGE_BUILD_RE.fullmatch(work.name)
    if found is None:
        return None
    return work.parent / f".{found['kind'] or 'guest'}-{found['hash']}.lock"


def _find(image_dir: Path, vms: list[VmInfo]) -> tuple[dict[Path, Path], dict[Path, list[str]]]:
    """Every build directory of the cache with its lock, and the builder VMs of each
    (blocking: it lists the cache)."""
    image_dir = Path(os.path.abspath(image_dir))
    templates = image_dir / "templates"
    work_dirs: dict[Path, Path] = {}
    if templates.is_dir():
        for entry in templates.iterdir():
            if entry.name.endswith(BUILD_SUFFIX) and entry.is_dir() and not entry.is_symlink():
                work_dirs[entry] = _template_lock(entry)
    if image_dir.is_dir():
        for entry in image_dir.iterdir():
            lock = _image_lock(entry)
            if lock is not None and entry.is_dir() and not entry.is_symlink():
                work_dirs[entry] = lock
    builders: dict[Path, list[str]] = {}
    for vm in vms:
        work = Path(os.path.abspath(vm.handle.agent_socket_path)).parent
        if (vm.handle.capsule_id.startswith(BUILDER_PREFIX) and work.parent == templates
                and work.name.endswith(BUILD_SUFFIX)):
            builders.setdefault(work, []).append(vm.handle.capsule_id)
            work_dirs.setdefault(work, _template_lock(work))
    return work_dirs, builders


def _template_lock(work: Path) -> Path:
    return build_lock(work.with_name(work.name[: -len(BUILD_SUFFIX)]))


async def reap_stale_builds(driver: Driver | None, image_dir: Path) -> Reaped:
    """Destroy the builder VMs and remove the build directories no build holds (see the module).

    Args:
        driver: this host's driver (None: directories only).
        image_dir: the image cache (its ``templates/`` holds the template builds).
    """
    vms = await driver.list() if driver is not None else []
    work_dirs, builders = await trio.to_thread.run_sync(_find, image_dir, vms)
    out = Reaped()
    if not work_dirs:
        return out
    mounts = await trio.to_thread.run_sync(_mount_points)
    for work, lock in sorted(work_dirs.items()):
        if _has_mount(work, mounts):
            log.warning("a build directory has a mount point under it; left alone", extra={"dir": str(work)})
            continue
        try:
            fd = await trio.to_thread.run_sync(try_lock, lock)
        except OSError:
            log.warning("could not take a build's lock", exc_info=True, extra={"lock": str(lock)})
            continue
        if fd is None:
            out.busy.append(work)
            continue
        try:
            for builder_id in builders.get(work, []):
                assert driver is not None
                try:
                    await driver.destroy(builder_id, remove_disk=False)
                    out.vms.append(builder_id)
                except DriverError:
                    log.warning("could not destroy a killed build's VM", exc_info=True,
                                extra={"capsule_id": builder_id})
            if await trio.to_thread.run_sync(work.is_dir):
                try:
                    await trio.to_thread.run_sync(shutil.rmtree, work)
                    out.dirs.append(work)
                except OSError:
                    log.warning("could not remove a killed build's directory", exc_info=True,
                                extra={"dir": str(work)})
        finally:
            os.close(fd)
    if out.vms or out.dirs:
        log.info("reaped what killed builds left", extra={
            "vms": out.vms, "dirs": [str(d) for d in out.dirs], "in_progress": [str(d) for d in out.busy]})
    return out
