"""Pause and resume through the capsule's own RAM file: nothing is copied.

A capsule VM of the libvirt driver keeps its guest RAM in a file of its own,
``<capsule dir>/memory.ram``, mapped shared (``memory-backend-file,share=on``
through Dovecote's QEMU wrapper, :mod:`dovecote.vmmgr.emulator`): a capsule
created from a template starts on a sparse copy of the template's ``memory``
(its own inode: two capsules never share writable memory), a cold-booted one
on an empty sparse file. The RAM is already where a paused capsule needs it,
so:

pause
    stop the vCPUs; write the device state only (QEMU's ``x-ignore-shared``
    migration capability) to ``memory.sav.tmp``; write the domain's
    definition to ``memory.xml``; flush the RAM file's dirty pages
    (``fdatasync``); rename ``memory.sav.tmp`` to ``memory.sav`` (**the
    commit**: from here the paused image is complete); destroy the VM.
resume
    start QEMU (libvirt ``createXML`` of ``memory.xml``, paused) waiting for an
    incoming state, its RAM the same file mapped shared; load ``memory.sav``;
    unlink ``memory.sav`` (**the point of no return**: the image is spent
    before any vCPU can write to the RAM file, so it is never restored twice
    and a resumed capsule never sees stale pages); run the vCPUs.

``memory.sav`` is the name libvirt's save file has always had in a capsule
directory, so everything that asks "is there a saved VM?" (reconcile, the stop
path, the tests) keeps its answer; what is inside tells the two formats apart:
a QEMU migration stream (``QEVM``) is this module's device state, anything else
(``LibvirtQemudSave``) is a libvirt save image, which resume restores as
before (capsules paused by an older vmmgr, VMs whose RAM is not a capsule
file, the Cloud Hypervisor driver: :func:`pause` and :func:`restore` answer
``False``/``None`` and the caller takes libvirt's save/restore path).

Crash safety. A SIGKILL of vmmgr may stop either sequence anywhere; libvirt
keeps the VM, the files stay. Whoever drives a pause or resume holds an
exclusive ``flock`` on ``<capsule dir>/memory.lock`` (released by the kernel
when the process dies). When the driver opens, :func:`settle` looks at every
mapped VM whose lock is free and puts it in one of two states, so that
reconcile's rules ("a VM runs: ``running``"; "no VM, ``memory.sav`` there:
``paused``") hold:

======  ==========  ===============  ===================================================
VM      its vCPUs   complete image   settle does
======  ==========  ===============  ===================================================
none    --          yes              nothing: the capsule is paused
none    --          no               nothing (a leftover ``memory.sav.tmp`` is removed)
yes     stopped     yes              destroy the VM: the image is whole and no vCPU ran
                                     since it was written (a pause past its commit, a
                                     resume before its point of no return)
yes     stopped     no               run the vCPUs: a pause cut before its commit (the
                                     RAM file is the truth) or a resume past its point
                                     of no return; ``memory.sav.tmp`` removed
yes     running     yes              unlink the image: the vCPUs ran, it is stale
yes     running     no               nothing
======  ==========  ===============  ===================================================

:func:`decide` is that table without I/O (``tests/capsules/test_mapped_plan.py``).

Fault injection: ``DOVECOTE_VM_TEST_KILL_AT`` names a file; when it holds the
name of a step of :data:`PAUSE_STEPS` or :data:`RESUME_STEPS`, the process
SIGKILLs itself on reaching that step (``tests/capsules/test_mapped_kill_vm.py``).
Unset, the hook costs one dictionary lookup.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from dovecote.vmmgr.driver import Driver, DriverError, VmHandle
from dovecote.vmmgr.filelock import try_lock

RAM_FILE = "memory.ram"
IMAGE_FILE = "memory.sav"
IMAGE_TMP = "memory.sav.tmp"
XML_FILE = "memory.xml"
LOCK_FILE = "memory.lock"
QEMU_STREAM_MAGIC = b"QEVM"
KILL_AT_ENV = "DOVECOTE_VM_TEST_KILL_AT"

PAUSE_STEPS = ("pause.suspended", "pause.state_written", "pause.flushed", "pause.committed",
               "pause.destroyed")
RESUME_STEPS = ("resume.started", "resume.state_loaded", "resume.image_spent", "resume.running")


class Action(enum.StrEnum):
    """What :func:`settle` does with one mapped VM (see the module's table)."""

    NOTHING = "nothing"
    DESTROY_VM = "destroy_vm"
    RUN_VCPUS = "run_vcpus"
    DROP_IMAGE = "drop_image"


def decide(*, vm: bool, vcpus_running: bool, image_complete: bool) -> Action:
    """The module's decision table, without I/O."""
    if not vm:
        return Action.NOTHING
    if vcpus_running:
        return Action.DROP_IMAGE if image_complete else Action.NOTHING
    return Action.DESTROY_VM if image_complete else Action.RUN_VCPUS


def is_mapped_image(path: Path) -> bool:
    """Whether ``path`` is this module's device state (else a libvirt save image, or nothing)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == QEMU_STREAM_MAGIC
    except OSError:
        return False


def kill_point(step: str) -> None:
    """The fault-injection hook (see the module docstring)."""
    target = os.environ.get(KILL_AT_ENV)
    if not target:
        return
    try:
        wanted = Path(target).read_text().strip()
    except OSError:
        return
    if wanted == step:
        Path(target).write_text("")  # once: the restarted vmmgr must not die again
        os.kill(os.getpid(), signal.SIGKILL)


@asynccontextmanager
async def capsule_lock(directory: Path, *, timeout_s: float = 60.0) -> AsyncIterator[None]:
    """Hold ``directory``'s ``memory.lock`` (another process's pause or resume of it ends first)."""
    path = directory / LOCK_FILE
    with trio.fail_after(timeout_s):
        while (fd := await trio.to_thread.run_sync(try_lock, path)) is None:  # noqa: ASYNC110 - a file lock has no event
            await trio.sleep(0.05)
    try:
        yield
    finally:
        os.close(fd)


@runtime_checkable
class MappedDriver(Protocol):
    """What a driver offers for mapped pause and resume (the libvirt driver does)."""

    async def ram_file(self, capsule_id: str) -> Path | None: ...

    async def save_mapped(self, capsule_id: str, directory: Path, *, release: bool = True) -> None: ...

    async def release_paused(self, capsule_id: str) -> None: ...

    async def restore_mapped(self, directory: Path) -> VmHandle: ...


async def pause(driver: Driver, capsule_id: str, directory: Path, *, release: bool = True) -> bool:
    """Pause through the RAM file if the VM's RAM is ``directory``'s; ``False``: not such a VM
    (the caller saves it the old way). On failure the VM runs on (:class:`DriverError`).

    ``release=False`` returns at the commit (the capsule is paused: its image is whole
    and its vCPUs stopped), leaving the VM for :func:`release` (libvirt's destroy
    takes ~210 ms here), which the caller runs while still holding the capsule.
    """
    if not isinstance(driver, MappedDriver):
        return False
    async with capsule_lock(directory):
        if await driver.ram_file(capsule_id) != directory / RAM_FILE:
            return False
        await driver.save_mapped(capsule_id, directory, release=release)
    return True


async def release(driver: Driver, capsule_id: str) -> None:
    """Destroy the VM of a pause made with ``release=False`` (errors are logged)."""
    if isinstance(driver, MappedDriver):
        await driver.release_paused(capsule_id)


def own_ram_file(driver: Driver, directory: Path) -> Path | None:
    """Where a capsule in ``directory`` keeps its RAM when the driver gives capsules RAM
    files of their own (else ``None``: the driver keeps RAM in anonymous memory)."""
    return directory / RAM_FILE if getattr(driver, "own_ram", False) else None


async def restore(driver: Driver, directory: Path) -> VmHandle | None:
    """Resume a capsule paused by :func:`pause`; ``None``: its ``memory.sav`` is a libvirt save
    image (the caller restores it the old way). On failure the image is intact (DriverError)."""
    if not isinstance(driver, MappedDriver):
        return None
    if not await trio.to_thread.run_sync(is_mapped_image, directory / IMAGE_FILE):
        return None
    async with capsule_lock(directory):
        return await driver.restore_mapped(directory)


async def abandon_resume(driver: Driver, capsule_id: str, directory: Path) -> None:
    """A resume failed after the driver restored the VM (its agent did not answer, say): put the
    capsule back to paused. A mapped VM past its point of no return is paused again through its
    RAM file (destroying it would lose the capsule); any other VM is destroyed as before."""
    if isinstance(driver, MappedDriver) and not (directory / IMAGE_FILE).exists():
        try:
            mapped = await driver.ram_file(capsule_id) == directory / RAM_FILE
        except DriverError:
            mapped = False
        if mapped:
            # Errors propagate: the VM is left as it is rather than destroyed with the
            # only copy of the capsule's memory.
            async with capsule_lock(directory):
                await driver.save_mapped(capsule_id, directory)
            return
    await driver.destroy(capsule_id, remove_disk=False)
