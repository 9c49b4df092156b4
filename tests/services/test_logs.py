"""Structured logs: JSON lines with the request id, secrets masked."""

import json
import logging

import pytest

from dovecote.libs.context import bind_request_id
from dovecote.libs.logs import setup_logging


def test_a_log_line_is_json_with_request_id_and_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("unit", "info", "json")
    try:
        with bind_request_id("abc123"):
            logging.getLogger("dovecote.test").info(
                "signed in", extra={"user": "ana", "password": "hunter2", "api_key": "wrn_x",
                                    "meta": {"token": "t0k"}})
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        setup_logging("unit", "warning", "text")
    entry = json.loads(line)
    assert entry["msg"] == "signed in"
    assert entry["service"] == "unit"
    assert entry["request_id"] == "abc123"
    assert entry["user"] == "ana"
    assert entry["password"] == "***" and entry["api_key"] == "***"
    assert entry["meta"] == {"token": "***"}
    assert "hunter2" not in line and "t0k" not in line
