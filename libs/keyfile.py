"""Secret key files: created once, mode 0600, the same for every process that races to make one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from .logs import get_logger

log = get_logger("dovecote.libs.keyfile")


def read_or_create(path: Path, make: Callable[[], str], *, what: str) -> str:
    """The text of the key file ``path``, which is created with ``make()`` if missing.

    Creation is atomic: the key is written aside (0600) and hard-linked into
    place, so concurrent starts agree on one key. A file readable by others
    is used but logged (``what`` names it).
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make() + "\n")
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        finally:
            aside.unlink()
    if path.stat().st_mode & 0o077:
        log.warning("key file readable by others", extra={"what": what, "path": str(path)})
    return path.read_text().strip()
