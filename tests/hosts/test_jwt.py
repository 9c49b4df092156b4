"""The host JWT (HS256, PyJWT) and its key file."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import pytest

from dovecote.services.auth.host_tokens import load_jwt_key, sign_jwt, verify_jwt

KEY = b"k" * 32


def test_a_signed_token_verifies_and_carries_its_claims() -> None:
    token = sign_jwt({"sub": "host-1", "exp": time.time() + 60}, KEY)
    assert verify_jwt(token, KEY)["sub"] == "host-1"


def test_tampered_expired_foreign_and_unsigned_tokens_are_refused() -> None:
    token = sign_jwt({"sub": "host-1", "exp": time.time() + 60}, KEY)
    header, payload, signature = token.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"sub": "host-2", "exp": time.time() + 60})
                                      .encode()).rstrip(b"=").decode()
    none_header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    for bad in (f"{header}.{forged}.{signature}", f"{none_header}.{payload}.",
                sign_jwt({"sub": "host-1", "exp": time.time() - 1}, KEY),
                sign_jwt({"sub": "host-1", "exp": time.time() + 60}, b"x" * 32),
                "not-a-jwt", "a.b.c", ""):
        with pytest.raises(ValueError):
            verify_jwt(bad, KEY)


def test_the_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_jwt_key(str(tmp_path), None)
    assert load_jwt_key(str(tmp_path), None) == first
    assert stat.S_IMODE((tmp_path / "host-jwt.key").stat().st_mode) == 0o600
    assert load_jwt_key(str(tmp_path), "s" * 40) == b"s" * 40
