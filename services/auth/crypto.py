"""Identifiers, secrets and password hashes.

Opaque credentials (session ids, CSRF tokens, API keys, one-time tokens) are
random 256-bit values shown to their holder once; the database keeps only
their SHA-256, which is enough for values with that much entropy and lets a
lookup by hash stand in for a constant-time comparison. Passwords are hashed
with argon2id (libsodium through PyNaCl) and verified in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import nacl.exceptions
import nacl.pwhash

API_KEY_PREFIX = "wrn_"

# Interactive limits: ~0.1 s and 64 MiB per hash on this class of machine.
_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE


def new_id(prefix: str) -> str:
    """A new public identifier such as ``usr_3f9a...`` (16 hex characters)."""
    return f"{prefix}_{secrets.token_hex(8)}"


def new_token() -> str:
    """A new opaque credential (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def new_api_key() -> str:
    """A new API key: ``wrn_`` and 48 hex characters."""
    return API_KEY_PREFIX + secrets.token_hex(24)


def token_hash(token: str) -> bytes:
    """The SHA-256 under which a credential is stored and looked up."""
    return hashlib.sha256(token.encode()).digest()


def same(a: bytes, b: bytes) -> bool:
    """Constant-time equality."""
    return hmac.compare_digest(a, b)


def team_slug() -> str:
    """An immutable 12-character team slug such as ``a1b2c3-d1e2f3``."""
    raw = secrets.token_hex(6)
    return f"{raw[:6]}-{raw[6:]}"


def hash_password(password: str) -> str:
    """argon2id hash of ``password`` (an ASCII string in libsodium's format)."""
    return nacl.pwhash.argon2id.str(password.encode(), opslimit=_OPSLIMIT,
                                    memlimit=_MEMLIMIT).decode()


_DUMMY_HASH = hash_password(secrets.token_hex(16))


def verify_password(stored: str | None, password: str) -> bool:
    """True if ``password`` matches ``stored``; takes the same time when no hash exists."""
    try:
        return nacl.pwhash.verify((stored or _DUMMY_HASH).encode(), password.encode()) and bool(stored)
    except nacl.exceptions.InvalidkeyError:
        return False
