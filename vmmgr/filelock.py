"""Exclusive file locks that do not wait, shared by vmmgr's cross-process guards.

A capsule's ``memory.lock`` (:mod:`dovecote.vmmgr.mapped`: one pause or resume at a
time, across vmmgr processes) and a build's lock file (:mod:`dovecote.vmmgr.leftovers`:
whether a build still runs) are ``flock``\\ s, released by the kernel when their holder
dies.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["try_lock"]


def try_lock(path: Path) -> int | None:
    """``path`` locked (an open descriptor: close it to unlock), or None if held (blocking)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
