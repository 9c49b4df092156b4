"""The host JWT: what a registered vmmgr shows auth, and the key that signs it.

A compact HS256 JWT (RFC 7519) made and checked by PyJWT; claims ``iss``
(``dovecote``), ``typ`` (``host``), ``sub`` (the host id), ``chn`` (its
refresh chain), ``iat`` and ``exp``. The key is ``DOVECOTE_HOST_JWT_SECRET``
when set, else a random key created once in ``<data_dir>/host-jwt.key`` with
mode 0600.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import jwt

from dovecote.libs import keyfile
from dovecote.libs.config import ConfigError

KEY_FILE = "host-jwt.key"
MAX_TOKEN = 4096
ALGORITHM = "HS256"


def sign_jwt(claims: dict[str, Any], key: bytes) -> str:
    """A compact HS256 JWT of ``claims``."""
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify_jwt(token: str, key: bytes, now: float | None = None) -> dict[str, Any]:
    """The claims of a valid, unexpired HS256 JWT signed with ``key``.

    Raises:
        ValueError: malformed, another algorithm, bad signature or expired.
    """
    if not token or len(token) > MAX_TOKEN:
        raise ValueError("malformed token")
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[ALGORITHM],
            options={"require": ["exp"], "verify_exp": False, "verify_iat": False})
    except jwt.PyJWTError as exc:
        raise ValueError(f"invalid token: {exc}") from None
    if not isinstance(claims.get("exp"), int | float):
        raise ValueError("malformed claims")
    if claims["exp"] <= (time.time() if now is None else now):  # no leeway, as before
        raise ValueError("expired")
    return claims


def load_jwt_key(data_dir: str, secret: str | None) -> bytes:
    """The HS256 key: ``secret`` (``DOVECOTE_HOST_JWT_SECRET``), else ``<data_dir>/host-jwt.key``.

    The file is created once (mode 0600, atomically: written aside, then
    hard-linked into place, so concurrent starts agree on one key).
    """
    if secret:
        if len(secret) < 32:
            raise ConfigError("DOVECOTE_HOST_JWT_SECRET must have at least 32 characters")
        return secret.encode()
    path = Path(data_dir) / KEY_FILE
    key = keyfile.read_or_create(path, lambda: secrets.token_hex(32), what="the host JWT key file")
    if len(key) < 32:
        raise ConfigError(f"{path} does not hold a host JWT key")
    return key.encode()
