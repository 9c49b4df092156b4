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
from dataclasses import dataclass
from pathlib import Path

import trio

from dovecote.vmmgr.errors import VmmgrError

# The repository checkout's builder; DOVECOTE_GUEST_BUILDER points elsewhere
# (an installed package has no infra/ folder).
BUILDER = Path(__file__).resolve().parent.parent / "infra" / "guest" / "build.py"


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
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ImageError(f"{directory}: not a guest image ({exc})") from exc
        for path in (image.kernel, image.initrd, image.rootfs):
            if not path.is_file():
                raise ImageError(f"{directory}: {path.name} is missing")
        return image


async def ensure_guest_image(cache_dir: Path, *, builder: Path | None = None) -> GuestImage:
    """The guest image for the current inputs, built into ``cache_dir`` if needed.

    Raises:
        ImageError: the build failed (its stderr is in the message).
    """
    builder = builder or Path(os.environ.get("DOVECOTE_GUEST_BUILDER", BUILDER))
    result = await trio.run_process(
        [sys.executable, str(builder), "--cache-dir", str(cache_dir)],
        stdin=subprocess.DEVNULL,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace")[-4000:]
        raise ImageError(f"guest image build failed ({result.returncode}):\n{tail}")
    return GuestImage.from_dir(Path(result.stdout.decode().strip().splitlines()[-1]))
