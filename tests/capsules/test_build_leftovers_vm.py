"""What a killed template build left is reaped when vmmgr starts (``vmmgr/leftovers.py``),
on real libvirt/QEMU: before ``dovecote up`` the image cache holds a ``*.build`` directory
whose lock nobody holds, with its builder VM (``dovecote-tmpl-<hex>``, booting as a build's
does) still running, and another ``*.build`` directory whose lock this test holds (a build
in progress elsewhere). Once vmmgr serves capsules, the first is gone with its VM and the
second is untouched.

The fake-driver twin (every case of the rule, image builds included) is
``tests/vmmgr/test_build_leftovers.py``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

import pytest
import trio

from dovecote.vmmgr.accel import choose_accel, probe_key, probe_kvm
from dovecote.vmmgr.driver import VmNotFound, VmSpec
from dovecote.vmmgr.filelock import try_lock
from dovecote.vmmgr.images import ensure_guest_image
from dovecote.vmmgr.libvirt_driver import open_libvirt_driver
from dovecote.vmmgr.templates import BUILDER_PREFIX, build_lock
from tests.helpers.capsules import IMAGE_DIR, domains, running_capsule

pytestmark = pytest.mark.slow


async def _start_builder(builder_id: str, work: Path) -> None:
    """A template builder VM whose files are in ``work``, as a build starts it."""
    image_dir = Path(IMAGE_DIR)
    image = await ensure_guest_image(image_dir)
    accel = await choose_accel(probe=lambda: probe_kvm(image.kernel, image.initrd),
                               key=probe_key(image_id=image.image_id), cache_file=image_dir / "accel.json")
    async with open_libvirt_driver(accel=accel) as driver:
        await driver.create(VmSpec.in_dir(builder_id, work, image=image, vcpus=1, memory_mib=256))


async def _destroy(builder_id: str) -> None:
    image = await ensure_guest_image(Path(IMAGE_DIR))
    accel = await choose_accel(probe=lambda: probe_kvm(image.kernel, image.initrd),
                               key=probe_key(image_id=image.image_id),
                               cache_file=Path(IMAGE_DIR) / "accel.json")
    async with open_libvirt_driver(accel=accel) as driver:
        with contextlib.suppress(VmNotFound):
            await driver.destroy(builder_id)


def test_vmmgr_start_reaps_a_killed_template_build_and_leaves_a_running_one() -> None:
    templates = Path(IMAGE_DIR) / "templates"
    templates.mkdir(mode=0o755, parents=True, exist_ok=True)
    tag = secrets.token_hex(8)  # a template name no real build uses
    killed = templates / f"minimal-{tag}-test-1x256.build"
    running = templates / f"minimal-{tag}-test-2x256.build"
    builder_id = BUILDER_PREFIX + secrets.token_hex(6)
    held = None
    try:
        for work in (killed, running):
            work.mkdir(mode=0o755)
            (work / "memory").write_bytes(b"\0" * 4096)
        held = try_lock(build_lock(running.with_name(running.name.removesuffix(".build"))))
        assert held is not None
        trio.run(_start_builder, builder_id, killed)
        assert f"dovecote-{builder_id}" in domains()

        with running_capsule("dcleft-"):
            assert f"dovecote-{builder_id}" not in domains()
            assert not killed.exists()
            assert (running / "memory").exists()
    finally:
        if held is not None:
            os.close(held)
        if f"dovecote-{builder_id}" in domains():
            trio.run(_destroy, builder_id)
        for work in (killed, running):
            shutil.rmtree(work, ignore_errors=True)
        for work in (killed, running):
            build_lock(work.with_name(work.name.removesuffix(".build"))).unlink(missing_ok=True)
