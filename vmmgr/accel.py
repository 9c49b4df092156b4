"""Which accelerator runs the VMs: KVM where a guest really boots under it, else TCG.

``/dev/kvm`` existing is not enough: some hosts expose a KVM device that stock
guest kernels hang under (a PVM hypervisor inside a VM, a broken nested setup).
So KVM is chosen only after a *probe*: QEMU boots the guest image's kernel and
initramfs under KVM with ``dovecote.probe`` on the command line; the initramfs
prints ``DOVECOTE-PROBE-OK`` once its modules are loaded and powers off. A probe
that does not print the marker within a short timeout means TCG. The result is
cached in a small JSON file keyed by what could change it (host kernel, QEMU
binary, the KVM device, the guest image), so a host pays the timeout once.

``DOVECOTE_VM_ACCEL`` (``auto``, ``kvm``, ``tcg``) overrides the choice; ``kvm``
is still refused when ``/dev/kvm`` is missing.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from dovecote.libs.logs import get_logger
from dovecote.vmmgr.errors import VmmgrError

log = get_logger("dovecote.vmmgr.accel")

PROBE_MARKER = b"DOVECOTE-PROBE-OK"
PROBE_TIMEOUT = 20.0
KVM_DEVICE = Path("/dev/kvm")
QEMU_BINARY = "qemu-system-x86_64"


class Accel(enum.StrEnum):
    """A QEMU accelerator."""

    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        """The libvirt ``<domain type=...>`` for this accelerator."""
        return "kvm" if self is Accel.KVM else "qemu"


class AccelError(VmmgrError):
    """The requested accelerator cannot be used on this host."""


def parse_requested(value: str | None) -> Accel | None:
    """``DOVECOTE_VM_ACCEL``'s value: an accelerator, or ``None`` for automatic."""
    value = (value or "auto").strip().lower()
    if value == "auto":
        return None
    try:
        return Accel(value)
    except ValueError:
        raise AccelError(f"DOVECOTE_VM_ACCEL must be auto, kvm or tcg, not {value!r}") from None


def probe_key(*, image_id: str, kvm_device: Path = KVM_DEVICE, qemu: str | None = None) -> str:
    """What the probe's answer depends on; a different key means probe again."""
    parts = [os.uname().release, f"image={image_id}"]
    try:
        st = kvm_device.stat()
        parts.append(f"kvm={st.st_rdev}")
    except OSError:
        parts.append("kvm=none")
    qemu_path = qemu or shutil.which(QEMU_BINARY)
    if qemu_path:
        try:
            st = Path(qemu_path).stat()
            parts.append(f"qemu={qemu_path}:{st.st_size}:{int(st.st_mtime)}")
        except OSError:
            parts.append("qemu=none")
    return "|".join(parts)


CACHED_KEYS = 16
"""Answers kept per cache file: several installations (or test suites) with
different images share one image cache; with one answer, each would evict the
other's and re-probe (tens of seconds) at every vmmgr start."""


def _read_answers(cache_file: Path) -> dict[str, bool]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if isinstance(data.get("key"), str) and isinstance(data.get("kvm_boots"), bool):
        return {data["key"]: data["kvm_boots"]}  # the one-answer format of earlier versions
    answers = data.get("answers")
    if not isinstance(answers, dict):
        return {}
    return {k: v for k, v in answers.items() if isinstance(k, str) and isinstance(v, bool)}


def read_cached(cache_file: Path, key: str) -> bool | None:
    """The cached probe answer for ``key``, or ``None``."""
    return _read_answers(cache_file).get(key)


def write_cached(cache_file: Path, key: str, kvm_boots: bool) -> None:
    """Remember ``key``'s answer, with the newest :data:`CACHED_KEYS` - 1 others."""
    answers = _read_answers(cache_file)
    answers.pop(key, None)
    answers[key] = kvm_boots
    kept = dict(list(answers.items())[-CACHED_KEYS:])
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache_file.parent, delete=False, suffix=".tmp") as f:
        json.dump({"answers": kept}, f)
    os.replace(f.name, cache_file)


async def choose_accel(
    *,
    probe: Callable[[], Awaitable[bool]],
    key: str,
    cache_file: Path | None,
    requested: str | None = None,
    kvm_device: Path = KVM_DEVICE,
) -> Accel:
    """Pick the accelerator.

    Args:
        probe: boots a guest under KVM and says whether it came up (see :func:`probe_kvm`).
        key: :func:`probe_key` for this host and image.
        cache_file: where the probe's answer is kept (``None``: probe every time).
        requested: ``auto`` (default), ``kvm`` or ``tcg``; defaults to ``$DOVECOTE_VM_ACCEL``.
        kvm_device: the KVM device node.

    Raises:
        AccelError: ``kvm`` was requested but the host has no KVM device, or the
            request is not a known accelerator.
    """
    wanted = parse_requested(os.environ.get("DOVECOTE_VM_ACCEL") if requested is None else requested)
    has_kvm = os.access(kvm_device, os.R_OK | os.W_OK)
    if wanted is Accel.TCG:
        return Accel.TCG
    if wanted is Accel.KVM:
        if not has_kvm:
            raise AccelError(f"KVM requested but {kvm_device} is missing or not accessible")
        return Accel.KVM
    if not has_kvm:
        return Accel.TCG
    cached = read_cached(cache_file, key) if cache_file is not None else None
    if cached is None:
        cached = await probe()
        log.info("KVM probe", extra={"kvm_boots": bool(cached)})
        if cache_file is not None:
            write_cached(cache_file, key, cached)
    return Accel.KVM if cached else Accel.TCG


async def probe_kvm(
    kernel: Path,
    initrd: Path,
    *,
    timeout: float = PROBE_TIMEOUT,  # noqa: ASYNC109 - the probe's own limit: QEMU is killed at it
    qemu: str = QEMU_BINARY,
) -> bool:
    """Boot ``kernel`` + ``initrd`` under KVM; ``True`` if the initramfs printed the probe marker.

    QEMU is killed at the deadline: a guest that hangs under this host's KVM is a ``False``.
    """
    argv = [
        qemu, "-accel", "kvm", "-machine", "pc", "-cpu", "host", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet dovecote.probe",
    ]  # fmt: skip
    seen = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
            )
            with trio.move_on_after(timeout):
                assert process.stdout is not None
                async for chunk in process.stdout:
                    seen += chunk
                    if PROBE_MARKER in seen:
                        break
            process.kill()
    except OSError as exc:
        log.warning("KVM probe could not run", extra={"qemu": str(qemu), "error": str(exc)})
        return False
    return PROBE_MARKER in seen
