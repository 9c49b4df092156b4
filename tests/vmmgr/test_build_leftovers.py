"""What killed builds leave in the image cache is reaped when vmmgr's driver comes up
(``vmmgr/leftovers.py``, called by ``vmmgr/service.py``'s bring-up): a template build's
``*.build`` directory and its builder VM (``dovecote-tmpl-<hex>``), a builder VM whose
directory a later build replaced, an image build's ``.build-*`` directory; never a build
whose lock is held (another vmmgr sharing the cache, or this one), a finished template,
nor a capsule's VM.

The hypervisor is :class:`~tests.capsules.fakes.AgentProcessDriver` (each "VM" is the real
guest agent in a host process, listed and destroyed like a domain); the builds' locks are
real ``flock`` locks, one held by another process as a concurrent vmmgr's build would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from dovecote.vmmgr.driver import VmSpec
from dovecote.vmmgr.leftovers import reap_stale_builds, try_lock
from dovecote.vmmgr.templates import BUILDER_PREFIX, build_lock
from tests.capsules.fakes import AgentProcessDriver, fake_image

HOLD = ("import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'w')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")


@pytest.fixture
def image_dir() -> Iterator[Path]:
    # Short: agent socket paths must fit in 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="dcimg-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def _vm(driver: AgentProcessDriver, capsule_id: str, directory: Path) -> str:
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    await driver.create(VmSpec(capsule_id=capsule_id, image=fake_image(directory), vcpus=1,
                               memory_mib=512, overlay_path=directory / "disk.qcow2",
                               agent_socket_path=directory / "agent.sock",
                               console_log_path=directory / "console.log"))
    return capsule_id


async def _hold_elsewhere(lock: Path) -> trio.Process:
    """``lock`` held by another process (a build of another vmmgr on the same cache)."""
    proc = await trio.lowlevel.open_process([sys.executable, "-c", HOLD, str(lock)],
                                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    said = b""
    with trio.fail_after(10):
        while not said.endswith(b"\n"):
            said += await proc.stdout.receive_some()
    assert said == b"locked\n"
    return proc


async def _end(proc: trio.Process) -> None:
    proc.kill()
    await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.aclose()


async def test_start_reaps_killed_builds_and_leaves_running_ones(image_dir: Path) -> None:
    templates = image_dir / "templates"
    driver = AgentProcessDriver()
    holder = None
    try:
        # A template build killed mid-way: its directory and its builder VM.
        killed = templates / "minimal-aaaa-tcg-1x512.build"
        killed_vm = await _vm(driver, BUILDER_PREFIX + "a1", killed)
        (killed / "memory").write_bytes(b"\0" * 4096)
        # A killed build's VM whose directory a later build already replaced.
        replaced = templates / "minimal-bbbb-tcg-1x512.build"
        replaced_vm = await _vm(driver, BUILDER_PREFIX + "b2", replaced)
        shutil.rmtree(replaced)
        # A template build running in another vmmgr: its lock is held.
        running = templates / "desktop-cccc-tcg-2x2048.build"
        running_vm = await _vm(driver, BUILDER_PREFIX + "c3", running)
        holder = await _hold_elsewhere(build_lock(templates / "desktop-cccc-tcg-2x2048"))
        # Not leftovers: a finished template, a capsule's VM.
        finished = templates / "minimal-aaaa-tcg-1x512-5120M"
        finished.mkdir()
        (finished / "state").write_bytes(b"state")
        capsule_vm = await _vm(driver, "cap-0123456789abcdef", image_dir / "run" / "cap-0123456789abcdef")
        # Image builds: one killed, one running in this process.
        killed_image = image_dir / ".build-0123456789abcdef-k1ll3d"
        (killed_image / "artifacts").mkdir(parents=True)
        running_image = image_dir / ".build-desktop-fedcba9876543210-l1ve"
        running_image.mkdir()
        own = try_lock(image_dir / ".desktop-fedcba9876543210.lock")
        assert own is not None

        reaped = await reap_stale_builds(driver, image_dir)

        assert sorted(reaped.vms) == [killed_vm, replaced_vm]
        assert sorted(reaped.dirs) == sorted([killed, killed_image])
        assert sorted(reaped.busy) == sorted([running, running_image])
        assert sorted(driver.destroyed) == [killed_vm, replaced_vm]
        assert {vm.handle.capsule_id for vm in await driver.list()} == {running_vm, capsule_vm}
        assert not killed.exists() and not killed_image.exists()
        assert running.is_dir() and running_image.is_dir() and (finished / "state").exists()
        assert (image_dir / "run" / capsule_vm).is_dir()

        # Once those builds are gone too (the other vmmgr killed, this one's lock let go),
        # the next start reaps what they left.
        await _end(holder)
        os.close(own)
        reaped = await reap_stale_builds(driver, image_dir)
        assert reaped.vms == [running_vm] and reaped.busy == []
        assert sorted(reaped.dirs) == sorted([running, running_image])
        assert {vm.handle.capsule_id for vm in await driver.list()} == {capsule_vm}
        assert sorted(p.name for p in templates.iterdir() if not p.name.endswith(".lock")) == [finished.name]

        # Nothing left: a start with nothing to reap does nothing.
        reaped = await reap_stale_builds(driver, image_dir)
        assert (reaped.vms, reaped.dirs, reaped.busy) == ([], [], [])
    finally:
        if holder is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await _end(holder)
        driver.kill_all()


async def test_a_build_directory_with_a_mount_under_it_is_left_alone(image_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed image build may leave a chroot's mounts: never delete through them."""
    from dovecote.vmmgr import leftovers

    work = image_dir / ".build-0123456789abcdef-m0unt"
    (work / "rootfs" / "proc").mkdir(parents=True)
    monkeypatch.setattr(leftovers, "_mount_points", lambda: [Path("/"), work / "rootfs" / "proc"])
    reaped = await reap_stale_builds(None, image_dir)
    assert (reaped.dirs, reaped.busy) == ([], []) and (work / "rootfs" / "proc").is_dir()
