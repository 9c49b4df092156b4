"""What storage reclaim finds on the host's file systems (blocking: run in a worker thread).

Three kinds of directory are candidates, each only when nothing uses it:

- ``guest_image`` (tier ``cache``): an image artifact directory in the guest image
  cache (``<image_dir>/<name>-<hash>/`` with a ``manifest.json``) that is not the
  newest of its name, is older than ``stale_s``, is the backing file of no qcow2
  overlay under this data directory (capsules, templates), is open in no running
  process (QEMU keeps its base disk open) and whose build lock nobody holds;
- ``image_build_workdir`` (tier ``legacy_build``): a ``.build-*`` work directory
  the image builder left behind (a crashed or killed build), unlocked and stale;
- ``stale_runtime_dir`` (tier ``runtime``): a desktop session's runtime directory
  (``<xvfb_root>/sessions/<id>``) older than ``stale_s`` that no process refers to
  (command line, working directory, open files).

"Uses" is checked for real (``/proc``, qcow2 headers, ``flock``), and what these
checks cannot see is returned as limitations.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import time
from collections.abc import Iterable
from pathlib import Path

from dovecote.bus.messages.recorder import ReclaimCandidate

LIMITATIONS = [
    "guest images: only qcow2 overlays under this data directory and running processes are "
    "checked; a paused or stopped capsule of another Dovecote installation sharing the image "
    "cache is not visible, so set DOVECOTE_RECORDER_RECLAIM_IMAGES=false on shared caches",
    "capsule run directories and template files belong to vmmgr (reconciled there), not listed",
    "exported review bundles are never deleted by Dovecote, so they are never candidates",
    "evidence of a subject whose owning service died without closing it stays until that "
    "service closes it (the recorder cannot tell a live session from a forgotten one)",
]

QCOW2_MAGIC = b"QFI\xfb"


def backing_file(path: Path) -> str | None:
    """The backing file named in a qcow2 header (None: not qcow2, or no backing file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if not offset or not size or size > 4096:
                return None
            f.seek(offset)
            return f.read(size).decode("utf-8", "replace")
    except OSError:
        return None


def _qcow2_files(roots: Iterable[Path]) -> list[Path]:
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.endswith(".qcow2"):
                    found.append(Path(dirpath) / name)
    return found


def paths_in_use(prefixes: list[str]) -> set[str]:
    """Which of ``prefixes`` (absolute directories) a running process refers to."""
    used: set[str] = set()
    if not prefixes:
        return used
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        base = f"/proc/{pid}"
        refs: list[str] = []
        with contextlib.suppress(OSError):
            refs.extend(open(f"{base}/cmdline", "rb").read().decode("utf-8", "replace").split("\0"))
        with contextlib.suppress(OSError):
            refs.append(os.readlink(f"{base}/cwd"))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    refs.append(os.readlink(f"{base}/fd/{fd}"))
        for ref in refs:
            for prefix in prefixes:
                if prefix not in used and (ref == prefix or ref.startswith(prefix + "/")
                                           or f"{prefix}/" in ref):
                    used.add(prefix)
    return used


def _locked(lock_path: Path) -> bool:
    """True if another process holds ``lock_path``'s flock (a build in progress)."""
    if not lock_path.exists():
        return False
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _age_s(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def scan(*, image_dir: Path | None, data_dir: Path, xvfb_root: Path | None, stale_s: float,
         images: bool = True, now: float | None = None) -> list[ReclaimCandidate]:
    """Every directory candidate on this host, sorted by path."""
    now = time.time() if now is None else now
    found: list[ReclaimCandidate] = []
    dirs: list[tuple[Path, str, str, str]] = []  # path, tier, kind, reason
    if image_dir is not None and image_dir.is_dir():
        backing = {os.path.realpath(os.path.join(p.parent, b))
                   for p in _qcow2_files([data_dir / "capsules", data_dir / "templates"])
                   if (b := backing_file(p))}
        newest: dict[str, tuple[float, Path]] = {}
        artifacts = []
        for entry in sorted(image_dir.iterdir()):
            if entry.name.startswith(".build-") and entry.is_dir():
                lock = image_dir / f".{entry.name[len('.build-'):].split('-')[0]}.lock"
                if _age_s(entry, now) >= stale_s and not _locked(lock):
                    dirs.append((entry, "legacy_build", "image_build_workdir",
                                 f"an image build work directory left behind "
                                 f"{int(_age_s(entry, now))} s ago"))
                continue
            manifest = entry / "manifest.json"
            if not entry.is_dir() or entry.name.startswith(".") or not manifest.exists():
                continue
            family = entry.name.rsplit("-", 1)[0]
            mtime = manifest.stat().st_mtime
            if family not in newest or mtime > newest[family][0]:
                newest[family] = (mtime, entry)
            artifacts.append((entry, family))
        for entry, family in artifacts if images else []:
            if newest[family][1] == entry or _age_s(entry / "manifest.json", now) < stale_s:
                continue
            real = os.path.realpath(entry)
            if any(b == real or b.startswith(real + "/") for b in backing):
                continue
            if _locked(image_dir / f".{entry.name}.lock"):
                continue
            dirs.append((entry, "cache", "guest_image",
                         f"an older guest image ({family}; {newest[family][1].name} is newer), "
                         "backing no overlay of this data directory"))
    if xvfb_root is not None and (xvfb_root / "sessions").is_dir():
        for entry in sorted((xvfb_root / "sessions").iterdir()):
            if entry.is_dir() and _age_s(entry, now) >= stale_s:
                dirs.append((entry, "runtime", "stale_runtime_dir",
                             "a desktop session runtime directory no process refers to"))
    used = paths_in_use([os.path.realpath(p) for p, *_ in dirs])
    for path, tier, kind, reason in dirs:
        if os.path.realpath(path) in used:
            continue
        found.append(ReclaimCandidate(path=str(path), tier=tier,  # type: ignore[arg-type]
                                      kind=kind, reason=reason, bytes=tree_bytes(path)))
    found.sort(key=lambda c: c.path)
    return found


def remove_dir(path: str) -> bool:
    """Remove a candidate directory; False if it was already gone."""
    if not os.path.lexists(path):
        return False
    shutil.rmtree(path)
    return True
