"""Secret key files: created once, mode 0600, the same for every process that races to make one."""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError
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


SECRET_KEY_SIZE = 32
"""Bytes of a SecretBox key (``nacl.secret.SecretBox.KEY_SIZE``)."""


def secret_key(value: str | None, path: Path, *, variable: str, what: str) -> bytes:
    """A 32-byte SecretBox key: ``value`` (the operator's ``variable``, base64) if set, else
    the key file ``path``, created once with a random key (:func:`read_or_create`).

    Raises:
        ConfigError: the variable or the file does not hold 32 base64 bytes.
    """
    if value:
        return decode_key(value, variable)
    text = read_or_create(path, lambda: base64.b64encode(secrets.token_bytes(SECRET_KEY_SIZE)).decode(),
                          what=what)
    return decode_key(text, str(path))


def decode_key(text: str, where: str) -> bytes:
    """32 bytes from standard or URL-safe base64, padding optional (``where`` names the source)."""
    text = text.strip()
    altchars = b"-_" if "-" in text or "_" in text else None
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where} must be base64 of {SECRET_KEY_SIZE} bytes") from None
    if len(key) != SECRET_KEY_SIZE:
        raise ConfigError(f"{where} must be base64 of {SECRET_KEY_SIZE} bytes")
    return key
