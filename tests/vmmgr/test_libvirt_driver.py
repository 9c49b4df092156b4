"""A real capsule VM under libvirt/QEMU (TCG unless KVM really boots guests here).

The session fixture sets the machine up itself: Debian packages
(infra/system-deps.sh), the libvirt daemons (infra/start-libvirt.sh), the guest
image (infra/guest/build.py, cached by content hash under
$DOVECOTE_TEST_VM_DIR, default /var/tmp/dovecote (images/ is vmmgr's own cache), so a rebuild happens
only when its inputs change) and the accelerator (vmmgr/accel.py, probe result
cached next to the image). The files live outside pytest's temporary
directories because libvirt's QEMU user must be able to reach them.

One VM for the whole module: TCG boots are slow.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from dovecote.vmmgr.accel import Accel, choose_accel, probe_key, probe_kvm
from dovecote.vmmgr.images import GuestImage, ensure_guest_image

REPO = Path(__file__).resolve().parents[2]
VM_DIR = Path(os.environ.get("DOVECOTE_TEST_VM_DIR", "/var/tmp/dovecote"))


@dataclass(frozen=True)
class VmHost:
    image: GuestImage
    accel: Accel
    run_dir: Path


@pytest.fixture(scope="session")
def vm_host() -> Iterator[VmHost]:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("capsule VMs need an x86_64 Linux host")
    if os.geteuid() != 0:
        pytest.skip("capsule VM tests need root (debootstrap, the system libvirtd)")
    if shutil.which("apt-get") is None:
        pytest.skip("capsule VM tests need a Debian host (apt-get) to install QEMU and libvirt")
    subprocess.run([str(REPO / "infra" / "system-deps.sh")], check=True)
    subprocess.run([str(REPO / "infra" / "start-libvirt.sh")], check=True)
    VM_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    VM_DIR.chmod(0o755)
    # The same per-machine cache vmmgr uses by default: one build for all.
    image = trio.run(ensure_guest_image, VM_DIR / "images")

    async def pick() -> Accel:
        return await choose_accel(
            probe=lambda: probe_kvm(image.kernel, image.initrd),
            key=probe_key(image_id=image.image_id),
            cache_file=VM_DIR / "images" / "accel.json",
        )

    accel = trio.run(pick)
    (VM_DIR / "run").mkdir(mode=0o755, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="s-", dir=VM_DIR / "run"))
    run_dir.chmod(0o755)
    try:
        yield VmHost(image=image, accel=accel, run_dir=run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.slow
async def test_capsule_vm_boots_runs_the_agent_survives_save_restore_and_leaves_nothing(
    vm_host: VmHost,
) -> None:
    from dovecote.vmmgr.driver import VmExists, VmNotFound, VmSpec, VmState
    from dovecote.vmmgr.guest import open_agent
    from dovecote.vmmgr.libvirt_driver import open_libvirt_driver

    capsule_id = f"t-{secrets.token_hex(4)}"
    directory = vm_host.run_dir / capsule_id
    directory.mkdir(mode=0o755)
    spec = VmSpec.in_dir(capsule_id, directory, image=vm_host.image, vcpus=1, memory_mib=256)
    saved = directory / "state.save"

    async with open_libvirt_driver(accel=vm_host.accel) as driver:
        try:
            with trio.fail_after(300):
                handle = await driver.create(spec)
                assert handle.name == f"dovecote-{capsule_id}"
                assert handle.accel is vm_host.accel
                assert spec.overlay_path.is_file()
                with pytest.raises(VmExists):
                    await driver.create(spec)
                listed = {info.handle.capsule_id: info for info in await driver.list()}
                assert listed[capsule_id].handle == handle
                assert listed[capsule_id].state is VmState.RUNNING
                assert await driver.agent_socket(capsule_id) == spec.agent_socket_path

                # The guest's init ran, named the virtio-serial port and started the agent.
                async with open_agent(str(handle.agent_socket_path), connect_timeout=180) as agent:
                    boot_id = agent.pong.boot_id
                    result = await agent.exec("cat /proc/cmdline; ip -4 addr show eth0 || busybox ip -4 addr")
                    assert result.exit_code == 0, result
                    assert "root=/dev/vda" in result.stdout
                    assert "10.0.2.15/24" in result.stdout
                assert "dovecote-init: ready, agent port /dev/virtio-ports/org.dovecote.agent" in (
                    spec.console_log_path.read_text(errors="replace")
                )

                await driver.pause(capsule_id)
                assert await driver.state(capsule_id) is VmState.PAUSED
                await driver.resume(capsule_id)

                # Save frees the VM and keeps its disk; restore continues the same boot.
                await driver.save(capsule_id, saved)
                assert capsule_id not in {info.handle.capsule_id for info in await driver.list()}
                assert spec.overlay_path.is_file()
                assert (await driver.restore(saved)) == handle
                async with open_agent(str(handle.agent_socket_path), connect_timeout=60) as agent:
                    assert agent.pong.boot_id == boot_id
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(VmNotFound):
                await driver.destroy(capsule_id)

        assert capsule_id not in {info.handle.capsule_id for info in await driver.list()}
        with pytest.raises(VmNotFound):
            await driver.state(capsule_id)
        with pytest.raises(VmNotFound):
            await driver.destroy(capsule_id)
        assert not spec.overlay_path.exists()
        assert not spec.agent_socket_path.exists()
