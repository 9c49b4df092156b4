"""Pause and resume through the RAM file on real QEMU VMs (the libvirt driver, no ``dovecote up``).

- template clones and resumed capsules share no writable memory or disk;
- a vmmgr SIGKILLed at each step of a pause and of a resume loses nothing: a
  child process plays vmmgr's part (``mapped.pause`` / ``mapped.restore``) and
  kills itself at the step (``DOVECOTE_VM_TEST_KILL_AT``); the driver opened
  next settles the VM (:func:`dovecote.vmmgr.mapped.decide`), and the capsule is
  either running, or paused with a complete image that resumes, with its
  processes and files.

Skips like the other VM tests when libvirt cannot be used here.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from dovecote.vmmgr import accel as accel_mod
from dovecote.vmmgr import mapped
from dovecote.vmmgr.driver import VmNotFound, VmSpec, VmState
from dovecote.vmmgr.emulator import install_wrapper
from dovecote.vmmgr.guest import open_agent
from dovecote.vmmgr.images import ensure_guest_image
from dovecote.vmmgr.libvirt_driver import DEFAULT_URI, LibvirtDriver, open_libvirt_driver
from dovecote.vmmgr.templates import TemplateFiles, ensure_minimal
from tests.helpers.capsules import IMAGE_DIR, libvirt_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COUNTER = ("nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; "
           "mv /tmp/counter.new /tmp/counter; sleep 0.1; done' "
           ">/dev/null 2>&1 &")


@asynccontextmanager
async def open_driver() -> AsyncIterator[tuple[LibvirtDriver, TemplateFiles]]:
    image_dir = Path(IMAGE_DIR)
    image = await ensure_guest_image(image_dir)
    chosen = await accel_mod.choose_accel(
        probe=lambda: accel_mod.probe_kvm(image.kernel, image.initrd),
        key=accel_mod.probe_key(image_id=image.image_id), cache_file=image_dir / "accel.json")
    emulator = await trio.to_thread.run_sync(install_wrapper, image_dir)
    async with open_libvirt_driver(DEFAULT_URI, accel=chosen, emulator=emulator) as driver:
        template = await ensure_minimal(driver, image, image_dir, boot_timeout_s=300, disk_size_mib=5120)
        yield driver, template


def new_spec(driver: LibvirtDriver, template: TemplateFiles, top: Path, name: str) -> VmSpec:
    directory = top / name
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    if driver.qemu_owner is not None:  # QEMU binds the display socket in the capsule directory
        os.chown(directory, *driver.qemu_owner)
    spec = VmSpec.in_dir(f"mt-{os.urandom(3).hex()}-{name}", directory, image=template_image(template),
                         vcpus=template.vcpus, memory_mib=template.memory_mb)
    return template.restore_spec(spec)


_IMAGE: list[object] = []


def template_image(template: TemplateFiles) -> object:
    return _IMAGE[0]


async def own_ram(driver: LibvirtDriver, spec: VmSpec) -> None:
    """What vmmgr's first pause and resume of a capsule restored from a template do: a
    libvirt save, then a restore with the RAM in the capsule's own file."""
    directory = spec.overlay_path.parent
    assert await driver.ram_file(spec.capsule_id) is None  # the template's, copy-on-write
    assert not await mapped.pause(driver, spec.capsule_id, directory)  # not through a file yet
    save = directory / mapped.IMAGE_FILE
    await driver.save(spec.capsule_id, save)
    await driver.restore(save, memory_file=mapped.own_ram_file(driver, directory))
    save.unlink()
    assert await driver.ram_file(spec.capsule_id) == directory / mapped.RAM_FILE


async def sh(spec: VmSpec, cmd: str) -> str:
    with trio.fail_after(120):
        async with open_agent(str(spec.agent_socket_path), connect_timeout=120) as agent:
            result = await agent.exec(cmd, timeout=60)
    assert result.exit_code == 0, result
    return result.stdout


@pytest.fixture
def top() -> object:
    reason = libvirt_ready()
    if reason:
        pytest.skip(reason)
    path = Path(tempfile.mkdtemp(prefix="dcmapped-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _with_image() -> None:
    _IMAGE[:] = [await ensure_guest_image(Path(IMAGE_DIR))]


async def test_clones_and_resumed_capsules_share_no_writable_memory_or_disk(top: Path) -> None:
    await _with_image()
    async with open_driver() as (driver, template):
        specs = [new_spec(driver, template, top, n) for n in ("a", "b")]
        template_blocks = template.memory.stat().st_blocks
        try:
            for spec in specs:
                await driver.create(spec)
                await own_ram(driver, spec)
            a, b = specs
            await sh(a, "echo only-a > /dev/shm/mark; echo disk-a > ~/mark; sync")
            for _ in range(2):  # a resumed capsule too
                assert await mapped.pause(driver, a.capsule_id, a.overlay_path.parent)
                assert await mapped.restore(driver, a.overlay_path.parent) is not None
            assert (await sh(a, "cat /dev/shm/mark ~/mark")) == "only-a\ndisk-a\n"
            assert (await sh(b, "cat /dev/shm/mark ~/mark 2>/dev/null || echo none")) == "none\n"
            # Each maps its own RAM file, shared with nobody; the template is mapped by no one.
            rams = [await driver.ram_file(s.capsule_id) for s in specs]
            assert rams == [s.overlay_path.parent / mapped.RAM_FILE for s in specs]
            inodes = {os.stat(p).st_ino for p in rams if p is not None} | {os.stat(template.memory).st_ino}
            assert len(inodes) == 3
            maps = ""
            for spec in specs:
                found = await trio.run_process(["pgrep", "-f", f"guest=dovecote-{spec.capsule_id}"],
                                               capture_stdout=True)
                for pid in found.stdout.split():
                    maps += await trio.to_thread.run_sync(Path(f"/proc/{int(pid)}/maps").read_text)
            assert str(template.memory) not in maps
            for spec in specs:
                assert sum(str(spec.overlay_path.parent / mapped.RAM_FILE) in line
                           for line in maps.splitlines()) >= 1
            assert template.memory.stat().st_blocks == template_blocks
            assert len({os.stat(s.overlay_path).st_ino for s in specs}) == 2
        finally:
            for spec in specs:
                try:
                    await driver.destroy(spec.capsule_id)
                except VmNotFound:
                    pass


def _child(op: str, directory: str, capsule_id: str) -> None:
    """vmmgr's part, in a process that SIGKILLs itself at the step named in the kill file."""
    async def run() -> None:
        async with open_driver() as (driver, _template):
            if op == "pause":
                assert await mapped.pause(driver, capsule_id, Path(directory))
            else:
                assert await mapped.restore(driver, Path(directory)) is not None
    trio.run(run)


async def _state(driver: LibvirtDriver, capsule_id: str) -> VmState | None:
    try:
        return await driver.state(capsule_id)
    except VmNotFound:
        return None


@pytest.mark.parametrize("step", mapped.PAUSE_STEPS + mapped.RESUME_STEPS)
async def test_a_sigkill_at_each_step_of_pause_and_resume_loses_nothing(top: Path, step: str) -> None:
    await _with_image()
    kill_file = top / "kill-at"
    async with open_driver() as (driver, template):
        spec = new_spec(driver, template, top, "k")
        directory = spec.overlay_path.parent
        try:
            await driver.create(spec)
            await own_ram(driver, spec)
            await sh(spec, f"echo kept > ~/mark; sync; {COUNTER}")
            await trio.sleep(0.5)
            before = int(await sh(spec, "cat /tmp/counter"))
            op = step.split(".")[0]
            if op == "resume":
                assert await mapped.pause(driver, spec.capsule_id, directory)
        except BaseException:
            await driver.destroy(spec.capsule_id)
            raise
    kill_file.write_text(step)
    env = dict(os.environ, **{mapped.KILL_AT_ENV: str(kill_file), "PYTHONPATH": os.pathsep.join(
        filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))})
    child = await trio.run_process(
        [sys.executable, __file__, op, str(directory), spec.capsule_id], env=env, cwd=ROOT,
        check=False, capture_stderr=True)
    assert child.returncode == -9, (step, child.returncode, child.stderr.decode()[-2000:])

    async with open_driver() as (driver, _template):  # settles, as vmmgr's start does
        try:
            state = await _state(driver, spec.capsule_id)
            image = mapped.is_mapped_image(directory / mapped.IMAGE_FILE)
            # Never in between: running, or no VM and a complete image.
            assert (state is VmState.RUNNING and not image) or (state is None and image), (step, state, image)
            if state is None:
                assert await mapped.restore(driver, directory) is not None
            after = int(await sh(spec, "cat /tmp/counter"))
            assert after >= before
            await trio.sleep(0.5)
            assert int(await sh(spec, "cat /tmp/counter")) > after  # the process runs on
            assert await sh(spec, "cat ~/mark") == "kept\n"
        finally:
            try:
                await driver.destroy(spec.capsule_id)
            except VmNotFound:
                pass


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _IMAGE[:] = [trio.run(ensure_guest_image, Path(IMAGE_DIR))]
    _child(*sys.argv[1:4])
