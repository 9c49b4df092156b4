"""Snapshot benchmarks on real VMs: create from a template, pause and resume, paused size.

Run (as root, libvirt installed): ``.venv/bin/python benchmarks/snapshots.py
[--restores 10] [--cold-boots 2] [--cycles 2] [--sizes 256,512,1024]``.

Uses the VM driver layer directly (no ``dovecote up``): the libvirt driver with
Dovecote's QEMU wrapper, the accelerator vmmgr would choose, the shared guest
image cache ``DOVECOTE_TEST_IMAGE_DIR`` (default ``/var/tmp/dovecote/images``)
and the built-in ``minimal`` template cached there (built first if missing: one
cold boot). Per-VM files go to a fresh directory under ``/tmp``, removed at the
end with every VM the run made. It prints:

1. create from the template (restore) vs cold boot, both until the guest agent
   answers a ping: p50, min and max over ``--restores`` restores and
   ``--cold-boots`` boots (1 vCPU, 512 MB), their ratio, and whether the
   target (create p50 <= 150 ms and >= 20x faster than a cold boot) is met;
2. pause (``Driver.save``) and resume (``Driver.restore`` until the agent
   answers a ping) by memory size; each size is a cold-booted VM, plus one
   512 MB VM created from the template (what a ``minimal`` capsule is);
3. the on-disk size of each paused VM: the save file's allocated bytes
   (``st_blocks * 512``) plus its disk overlay's, against its memory size;
4. create through the product (``dovecote up``, ``POST /v1/capsules`` until
   ``GET`` says ``running``, polled every 10 ms) with the warm pool (a paused
   spare restored ahead of time, ``DOVECOTE_VM_POOL_SIZE=1``) and without it
   (a restore per create), ``--api-creates`` each (0 skips this part).

A run takes a few minutes under TCG (mostly the cold boots).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dovecote.vmmgr import accel as accel_mod  # noqa: E402
from dovecote.vmmgr.driver import Driver, DriverError, VmNotFound, VmSpec  # noqa: E402
from dovecote.vmmgr.emulator import install_wrapper  # noqa: E402
from dovecote.vmmgr.guest import open_agent  # noqa: E402
from dovecote.vmmgr.images import GuestImage, ensure_guest_image  # noqa: E402
from dovecote.vmmgr.libvirt_driver import DEFAULT_URI, open_libvirt_driver  # noqa: E402
from dovecote.vmmgr.templates import MINIMAL_VCPUS, TemplateFiles, ensure_minimal  # noqa: E402
from tests.helpers.capsules import IMAGE_DIR, libvirt_ready  # noqa: E402

MiB = 1024 * 1024
TARGET_CREATE_MS = 150.0
TARGET_SPEEDUP = 20.0
BOOT_TIMEOUT_S = 300.0
OP_TIMEOUT_S = 120.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _summary(samples: list[float]) -> str:
    """``p50 X (min Y, max Z)`` of samples in seconds."""
    if len(samples) == 1:
        return _ms(samples[0])
    return f"p50 {_ms(statistics.median(samples))} (min {_ms(min(samples))}, max {_ms(max(samples))})"


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


@dataclass
class Bench:
    """The driver, image and temp directory of one run, and the VMs it made."""

    driver: Driver
    image: GuestImage
    top: Path
    live: set[str] = field(default_factory=set)
    """Capsule ids that may have a VM now (destroyed at the end)."""

    def spec(self, name: str, memory_mib: int) -> VmSpec:
        """A spec for a new VM with its own 0755 directory (QEMU must reach its files)."""
        capsule_id = f"bench-{secrets.token_hex(3)}-{name}"
        directory = self.top / name
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        owner = getattr(self.driver, "qemu_owner", None)
        if owner is not None:  # QEMU binds the display socket (vnc.sock) in the VM's directory
            os.chown(directory, *owner)
        return VmSpec.in_dir(capsule_id, directory, image=self.image, vcpus=MINIMAL_VCPUS,
                             memory_mib=memory_mib)

    async def start(self, spec: VmSpec) -> None:
        self.live.add(spec.capsule_id)
        with trio.fail_after(OP_TIMEOUT_S):
            await self.driver.create(spec)

    async def destroy(self, capsule_id: str) -> None:
        try:
            await self.driver.destroy(capsule_id)
        except VmNotFound:
            pass
        self.live.discard(capsule_id)

    async def destroy_all(self) -> None:
        for capsule_id in sorted(self.live):
            try:
                await self.destroy(capsule_id)
            except DriverError as exc:
                print(f"warning: could not destroy VM of {capsule_id}: {exc}")


async def _agent_ready(socket_path: Path, timeout: float) -> None:  # noqa: ASYNC109 - a plain deadline
    """Connect to the guest agent (retrying until it is there) and get a ping answered."""
    with trio.fail_after(timeout):
        async with open_agent(str(socket_path), connect_timeout=timeout) as client:
            await client.ping(timeout=10)


async def _timed(fn: Callable[[], Awaitable[object]]) -> float:
    began = time.perf_counter()
    await fn()
    return time.perf_counter() - began


async def _cold_boot(bench: Bench, name: str, memory_mib: int, *, keep: bool) -> tuple[VmSpec, float]:
    """Boot a VM from the image until its agent answers; destroy it unless ``keep``."""
    spec = bench.spec(name, memory_mib)
    began = time.perf_counter()
    await bench.start(spec)
    await _agent_ready(spec.agent_socket_path, BOOT_TIMEOUT_S)
    elapsed = time.perf_counter() - began
    if not keep:
        await bench.destroy(spec.capsule_id)
    return spec, elapsed


async def _from_template(bench: Bench, template: TemplateFiles, name: str, *,
                         keep: bool) -> tuple[VmSpec, float, float]:
    """Create a VM from the template until its agent answers: (spec, total s, of which driver.create s)."""
    spec = template.restore_spec(bench.spec(name, template.memory_mb))
    began = time.perf_counter()
    await bench.start(spec)
    created = time.perf_counter() - began
    await _agent_ready(spec.agent_socket_path, OP_TIMEOUT_S)
    elapsed = time.perf_counter() - began
    if not keep:
        await bench.destroy(spec.capsule_id)
    return spec, elapsed, created


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _pq(samples: list[float]) -> str:
    return f"p50 {_ms(statistics.median(samples))} p99 {_ms(_p(samples, 0.99))}"


@dataclass
class MappedResult:
    label: str
    memory_mib: int
    dirty_mib: int
    pause_s: list[float]
    resume_s: list[float]
    on_disk: int
    steps: dict[str, list[float]]


async def _pause_resume_mapped(bench: Bench, spec: VmSpec, label: str, cycles: int,
                               dirty_mib: int) -> MappedResult:
    """Pause/resume through the RAM file (``vmmgr.mapped``), the guest dirtying ``dirty_mib``
    of memory (tmpfs) before each pause; resume is until the agent answers a ping."""
    from dovecote.vmmgr import mapped

    directory = spec.overlay_path.parent
    driver: Any = bench.driver
    if await driver.ram_file(spec.capsule_id) != directory / mapped.RAM_FILE:
        # Restored from a template (its RAM the template's, copy-on-write): a first pause
        # the old way, resumed into a RAM file of its own, as vmmgr does.
        save = directory / mapped.IMAGE_FILE
        await driver.save(spec.capsule_id, save)
        await driver.restore(save, memory_file=mapped.own_ram_file(driver, directory))
        save.unlink()
        await _agent_ready(spec.agent_socket_path, OP_TIMEOUT_S)
    pauses: list[float] = []
    resumes: list[float] = []
    steps: dict[str, list[float]] = {}
    on_disk = 0
    for cycle in range(cycles):
        with trio.fail_after(OP_TIMEOUT_S):
            async with open_agent(str(spec.agent_socket_path), connect_timeout=OP_TIMEOUT_S) as agent:
                await agent.exec(f"head -c {dirty_mib}M /dev/urandom > /dev/shm/dirty",
                                 timeout=60)
            began = time.perf_counter()
            assert await mapped.pause(bench.driver, spec.capsule_id, directory, release=False)
            pauses.append(time.perf_counter() - began)  # paused: image whole, vCPUs stopped
            await mapped.release(bench.driver, spec.capsule_id)  # as vmmgr does, after the status
            if cycle == 0:
                on_disk = sum(_allocated(directory / n) for n in (mapped.RAM_FILE, mapped.IMAGE_FILE,
                                                                   mapped.XML_FILE, "disk.qcow2"))
            began = time.perf_counter()
            assert await mapped.restore(bench.driver, directory) is not None
            await _agent_ready(spec.agent_socket_path, OP_TIMEOUT_S)
            resumes.append(time.perf_counter() - began)
            for key, value in driver.timings.items():
                if key.startswith(("pause.", "resume.")):
                    steps.setdefault(key, []).append(value)
            steps.setdefault("resume.agent_ready", []).append(resumes[-1] - driver.timings["resume.total"])
    return MappedResult(label=label, memory_mib=spec.memory_mib, dirty_mib=dirty_mib, pause_s=pauses,
                        resume_s=resumes, on_disk=on_disk, steps=steps)


@dataclass
class PauseResult:
    label: str
    memory_mib: int
    boot_s: float | None
    pause_s: list[float]
    resume_s: list[float]
    save_bytes: int
    overlay_bytes: int


async def _pause_resume(bench: Bench, spec: VmSpec, label: str, boot_s: float | None,
                        cycles: int) -> PauseResult:
    """Save and restore the running VM ``cycles`` times; size measured after the first save."""
    save_path = spec.overlay_path.parent / "memory.sav"
    pauses: list[float] = []
    resumes: list[float] = []
    save_bytes = overlay_bytes = 0
    for cycle in range(cycles):
        save_path.unlink(missing_ok=True)
        with trio.fail_after(OP_TIMEOUT_S):
            pauses.append(await _timed(lambda: bench.driver.save(spec.capsule_id, save_path)))
        bench.live.discard(spec.capsule_id)
        if cycle == 0:
            save_bytes, overlay_bytes = _allocated(save_path), _allocated(spec.overlay_path)

        async def resume() -> None:
            bench.live.add(spec.capsule_id)
            with trio.fail_after(OP_TIMEOUT_S):
                handle = await bench.driver.restore(save_path)
            await _agent_ready(handle.agent_socket_path, OP_TIMEOUT_S)

        resumes.append(await _timed(resume))
    await bench.destroy(spec.capsule_id)
    save_path.unlink(missing_ok=True)
    return PauseResult(label=label, memory_mib=spec.memory_mib, boot_s=boot_s, pause_s=pauses,
                       resume_s=resumes, save_bytes=save_bytes, overlay_bytes=overlay_bytes)


async def _run(args: argparse.Namespace, image_dir: Path, top: Path) -> int:
    """Image, accelerator, driver and template as vmmgr gets them, then measure."""
    began = time.monotonic()
    image = await ensure_guest_image(image_dir)
    chosen = await accel_mod.choose_accel(
        probe=lambda: accel_mod.probe_kvm(image.kernel, image.initrd),
        key=accel_mod.probe_key(image_id=image.image_id),
        cache_file=image_dir / "accel.json")
    emulator = await trio.to_thread.run_sync(install_wrapper, image_dir)
    async with open_libvirt_driver(DEFAULT_URI, accel=chosen, emulator=emulator) as driver:
        template = await ensure_minimal(driver, image, image_dir, boot_timeout_s=BOOT_TIMEOUT_S,
                                        disk_size_mib=args.disk_mib)
        print(f"guest image {image.image_id[:16]} (kernel {image.kernel_version}), accel {chosen}, "
              f"template {template.directory.name} ready in {time.monotonic() - began:.1f} s")
        bench = Bench(driver=driver, image=image, top=top)
        try:
            return await _measure(bench, template, args)
        finally:
            with trio.CancelScope(shield=True):
                await bench.destroy_all()


async def _measure(bench: Bench, template: TemplateFiles, args: argparse.Namespace) -> int:
    memory = template.memory_mb
    # 1. create from the template vs cold boot (512 MB); one VM at a time.
    await _from_template(bench, template, "warm", keep=False)  # page cache, libvirt caches
    creates: list[float] = []
    driver_parts: list[float] = []
    for i in range(args.restores):
        _spec, total, created = await _from_template(bench, template, f"r{i}", keep=False)
        creates.append(total)
        driver_parts.append(created)
    cold: list[float] = []
    kept: VmSpec | None = None
    for i in range(args.cold_boots):
        last = i == args.cold_boots - 1
        spec, elapsed = await _cold_boot(bench, f"c{i}", memory, keep=last and memory in args.sizes)
        cold.append(elapsed)
        if last and memory in args.sizes:
            kept = spec
    create_p50, cold_p50 = statistics.median(creates), statistics.median(cold)
    speedup = cold_p50 / create_p50
    print()
    print(f"1. create to agent-ready, {MINIMAL_VCPUS} vCPU / {memory} MB:")
    print(f"   from template ({args.restores}x): {_summary(creates)}; "
          f"of which driver.create (overlay, QEMU start, device state) {_summary(driver_parts)}")
    print(f"   cold boot ({args.cold_boots}x):     {_summary(cold)}")
    met = create_p50 * 1000 <= TARGET_CREATE_MS and speedup >= TARGET_SPEEDUP
    print(f"   ratio {speedup:.1f}x faster; target p50 <= {TARGET_CREATE_MS:.0f} ms and >= "
          f"{TARGET_SPEEDUP:.0f}x: {'met' if met else 'NOT met'} "
          f"(p50 {create_p50 * 1000:.0f} ms {'<=' if create_p50 * 1000 <= TARGET_CREATE_MS else '>'} "
          f"{TARGET_CREATE_MS:.0f} ms, {speedup:.1f}x {'>=' if speedup >= TARGET_SPEEDUP else '<'} "
          f"{TARGET_SPEEDUP:.0f}x)")

    # 2. and 3. pause / resume by memory size, and the paused capsule's size on disk.
    results: list[PauseResult] = []
    mapped_results: list[MappedResult] = []
    for size in args.sizes:
        if size == memory and kept is not None:
            spec, boot_s = kept, cold[-1]
        else:
            spec, boot_s = await _cold_boot(bench, f"m{size}", size, keep=True)
        mapped_results.append(await _pause_resume_mapped(bench, spec, f"{size} MB", args.mapped_cycles,
                                                         _dirty(args, size)))
        results.append(await _pause_resume(bench, spec, f"{size} MB", boot_s, args.cycles))
    spec, _total, _created = await _from_template(bench, template, "tsave", keep=True)
    mapped_results.append(await _pause_resume_mapped(bench, spec, f"{memory} MB (template)",
                                                     args.mapped_cycles, _dirty(args, memory)))
    results.append(await _pause_resume(bench, spec, f"{memory} MB (template)", None, args.cycles))

    print()
    print(f"2. pause (save) and resume (restore until the agent answers), {args.cycles} cycle(s) each:")
    for r in results:
        boot = f"cold boot {r.boot_s:.1f} s" if r.boot_s is not None else "created from template"
        print(f"   {r.label:<18} pause {_summary(r.pause_s)}; resume {_summary(r.resume_s)}  [{boot}]")
    print()
    print(f"2b. pause/resume through the RAM file (the new path), {args.mapped_cycles} cycles each, the "
          "guest rewriting a tmpfs file (the dirty memory) before each pause; pause: until paused (image "
          "committed, vCPUs stopped; the VM's release follows, pause.release_vm); resume: until the agent "
          "answers; goals: resume <= 150 ms p50, pause <= 250 ms per GiB dirty:")
    old = {r.label: r for r in results}
    for mr in mapped_results:
        o = old.get(mr.label)
        ratio = ""
        if o is not None:
            pause_x = statistics.median(o.pause_s) / statistics.median(mr.pause_s)
            resume_x = statistics.median(o.resume_s) / statistics.median(mr.resume_s)
            ratio = f"; vs libvirt save/restore: pause {pause_x:.1f}x, resume {resume_x:.1f}x faster"
        per_gib = statistics.median(mr.pause_s) / (mr.dirty_mib / 1024)
        print(f"   {mr.label:<18} {mr.dirty_mib} MiB dirty: pause {_pq(mr.pause_s)} ({_ms(per_gib)} per GiB "
              f"dirty); resume {_pq(mr.resume_s)}; on disk {mr.on_disk / MiB:.1f} MiB{ratio}")
        parts = ", ".join(f"{k} {_ms(statistics.median(v))}" for k, v in sorted(mr.steps.items()))
        print(f"      where the time goes (p50): {parts}")
    print()
    print("3. paused capsule on disk (allocated: save file + overlay) vs memory size:")
    for r in results:
        on_disk = r.save_bytes + r.overlay_bytes
        print(f"   {r.label:<18} {on_disk / MiB:7.1f} MiB (save {r.save_bytes / MiB:.1f} + overlay "
              f"{r.overlay_bytes / MiB:.1f}) = {on_disk / (r.memory_mib * MiB) * 100:.0f}% of "
              f"{r.memory_mib} MiB")
    return 0


def _dirty(args: argparse.Namespace, memory_mib: int) -> int:
    return int(args.dirty_mib) if args.dirty_mib else memory_mib // 4


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restores", type=int, default=10, help="creates from the template (default 10)")
    parser.add_argument("--cold-boots", type=int, default=2, help="cold boots to compare (default 2)")
    parser.add_argument("--mapped-cycles", type=int, default=10,
                        help="pause/resume cycles through the RAM file per size (default 10)")
    parser.add_argument("--cycles", type=int, default=2, help="pause/resume cycles per size (default 2)")
    parser.add_argument("--sizes", type=_sizes, default=[256, 512, 1024],
                        help="memory sizes in MB for pause/resume (default 256,512,1024)")
    parser.add_argument("--disk-mib", type=int, default=5120,
                        help="the minimal template's disk, as vmmgr makes it (default 5120)")
    parser.add_argument("--dirty-mib", type=int, default=0,
                        help="memory the guest writes before each mapped pause (default: a quarter "
                             "of its memory)")
    parser.add_argument("--image-dir", default=IMAGE_DIR, help=f"guest image cache (default {IMAGE_DIR})")
    parser.add_argument("--api-creates", type=int, default=5,
                        help="creates through dovecote up per pool setting (default 5; 0 skips)")
    args = parser.parse_args()
    if args.restores < 1 or args.cold_boots < 1 or args.cycles < 1:
        parser.error("--restores, --cold-boots and --cycles must be at least 1")
    if os.geteuid() != 0:
        print("cannot run: needs root (qemu:///system, the shared image cache)")
        return 2
    reason = libvirt_ready()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    image_dir = Path(args.image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="dcsnap-", dir="/tmp"))
    top.chmod(0o755)  # QEMU runs unprivileged: the VM directories must be searchable
    try:
        status = trio.run(_run, args, image_dir, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    if args.api_creates:
        print()
        print(f"4. create through the API (POST /v1/capsules until running), {args.api_creates}x each:")
        for pool_size in (1, 0):
            samples = _api_creates(image_dir, pool_size, args.api_creates)
            label = "warm pool (1 spare)" if pool_size else "restore per create"
            print(f"   {label:<20} {_summary(samples)}")
    return status


def _api_creates(image_dir: Path, pool_size: int, count: int) -> list[float]:
    """Seconds from POST /v1/capsules to status running, ``count`` times, one capsule at a time
    (``benchmarks/capsules.py`` ``api_creates``: vmmgr's own breakdown is printed too). With
    the pool, also ``count`` creates from a team snapshot template claiming a team spare."""
    from benchmarks.capsules import api_creates, wait_spares
    from tests.helpers.capsules import api_client, wait_status
    from tests.helpers.suite import Suite

    top = Path(tempfile.mkdtemp(prefix="dcapi-", dir="/tmp"))
    top.chmod(0o755)
    suite = Suite(data_dir=top / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": str(image_dir),
        "DOVECOTE_VM_POOL_SIZE": str(pool_size), "DOVECOTE_VM_TEAM_SPARES": str(2 if pool_size else 0)})
    try:
        suite.wait_ready()
        (top / "data").chmod(0o755)
        api = api_client(suite, "Bench")
        wait_spares(suite, "spares", 0)  # the template is ready
        creates = api_creates(suite, api, count, {}, spare_key="spares" if pool_size else None)
        print("   " + creates.report("minimal"))
        if pool_size:
            created = api.post("/v1/capsules", {})
            assert created.status_code == 202, created.text
            source = created.json()["id"]
            wait_status(api, source, "running")
            made = api.post("/v1/snapshots", {"sandbox_id": source, "name": "bench-tpl"}, timeout=600)
            assert made.status_code == 201, made.text
            api.delete(f"/v1/capsules/{source}")
            first = api_creates(suite, api, 2, {"template": "bench-tpl"})
            print("   " + first.report("team template, first two creates (no spare yet)"))
            team = api_creates(suite, api, count, {"template": "bench-tpl"}, spare_key="team_spares")
            print("   " + team.report("team template with a team spare"))
            ratio = statistics.median(team.total) / statistics.median(creates.total)
            print(f"   team template / minimal, both from a spare: {ratio:.2f}x")
        return creates.total
    finally:
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
