"""Guest images: the artifacts of ``infra/guest/build.py`` and how to get them.

An artifact directory (``<cache>/guest-<hash>/``) holds ``vmlinuz``,
``initrd.img``, ``rootfs.qcow2`` and ``manifest.json``; :class:`GuestImage`
reads it. :func:`ensure_guest_image` runs the builder, which reuses the cached
image when its inputs have not changed (a few seconds) and builds it otherwise
(about a minute: debootstrap, the kernel package, mke2fs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from dovecote.vmmgr.errors import VmmgrError

# The repository checkout's builder; DOVECOTE_GUEST_BUILDER points elsewhere
# (an installed package has no infra/ folder).
BUILDER = Path(__file__).resolve().parent.parent / "infra" / "guest" / "build.py"
DESKTOP_BUILDER = BUILDER.with_name("desktop.py")
"""The desktop variant's builder (X.Org on the VM's display; ``DOVECOTE_DESKTOP_BUILDER``)."""
PROGRESS_PREFIX = "build.py:"
"""How the builder's step lines begin on its stderr."""
STDERR_KEPT = 16384


class ImageError(VmmgrError):
    """A guest image is missing, incomplete or could not be built."""


@dataclass(frozen=True, kw_only=True)
class GuestImage:
    """A built guest image: what a VM boots from."""

    directory: Path
    image_id: str
    """The builder's input hash: two images with the same id are the same image."""
    kernel: Path
    initrd: Path
    rootfs: Path
    """The read-only qcow2 base of every capsule's copy-on-write overlay."""
    cmdline: str
    kernel_version: str
    video: str = "none"
    """The libvirt video model its VMs need (``vga`` for the desktop image, see
    ``infra/guest/desktop.py``; ``none``: no display device)."""

    @classmethod
    def from_dir(cls, directory: Path) -> GuestImage:
        """Read an artifact directory.

        Raises:
            ImageError: the manifest or a file it names is missing.
        """
        directory = directory.resolve()
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
            image = cls(
                directory=directory,
                image_id=str(manifest["hash"]),
                kernel=directory / manifest["kernel"],
                initrd=directory / manifest["initrd"],
                rootfs=directory / manifest["rootfs"],
                cmdline=str(manifest["cmdline"]),
                kernel_version=str(manifest["kernel_version"]),
                video=str(manifest.get("video", "none")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ImageError(f"{directory}: not a guest image ({exc})") from exc
        for path in (image.kernel, image.initrd, image.rootfs):
            if not path.is_file():
                raise ImageError(f"{directory}: {path.name} is missing")
        return image


async def ensure_guest_image(cache_dir: Path, *, builder: Path | None = None,
                             on_progress: Callable[[str], None] | None = None) -> GuestImage:
    """The guest image for the current inputs, built into ``cache_dir`` if needed.

    ``on_progress`` gets each step the builder announces (its ``build.py: ...``
    lines: debootstrap, kernel, initramfs, root filesystem), as it happens.

    Raises:
        ImageError: the build failed (its stderr is in the message).
    """
    builder = builder or Path(os.environ.get("DOVECOTE_GUEST_BUILDER", BUILDER))
    stdout = bytearray()
    stderr = bytearray()

    async def read_stdout(stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            stdout.extend(chunk)

    async def read_stderr(stream: trio.abc.ReceiveStream) -> None:
        line = bytearray()
        async for chunk in stream:
            stderr.extend(chunk)
            del stderr[:-STDERR_KEPT]
            line.extend(chunk)
            *complete, rest = bytes(line).split(b"\n")
            line[:] = rest
            for text in complete:
                step = text.decode(errors="replace").strip()
                if on_progress is not None and step.startswith(PROGRESS_PREFIX):
                    on_progress(step[len(PROGRESS_PREFIX):].strip()[:200])

    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(partial(
            trio.run_process, [sys.executable, str(builder), "--cache-dir", str(cache_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False))
        assert process.stdout is not None and process.stderr is not None
        nursery.start_soon(read_stdout, process.stdout)
        nursery.start_soon(read_stderr, process.stderr)
    if process.returncode != 0:
        tail = stderr.decode(errors="replace")[-4000:]
        raise ImageError(f"guest image build failed ({process.returncode}):\n{tail}")
    return GuestImage.from_dir(Path(stdout.decode().strip().splitlines()[-1]))
