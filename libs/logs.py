"""Structured logs: one JSON object per line on stderr, and in rotated files of the data directory.

Every line carries the time, level, service, logger and message, the request id
of the task that logged it (see :mod:`dovecote.libs.context`) and any ``extra``
fields. Keys that look like secrets (``password``, ``token``, ``secret``,
``api_key``, ``authorization``, ``cookie``) are masked before they are written,
so a careless ``log.info(..., extra={"token": t})`` leaks nothing.

Given a ``log_dir`` (``<data dir>/logs``), :func:`setup_logging` also writes
the same JSON lines (whatever the stderr format) to ``<service>.log`` there,
rotated at ``DOVECOTE_LOG_FILE_MAX_BYTES`` into ``<service>.log.1`` ...
``.<DOVECOTE_LOG_FILE_BACKUPS>``. One process writes one file; the gateway's
``/api/logs/*`` routes read them (:data:`LOG_FILE_NAME` is the name rule).
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from dovecote.libs.context import request_id

__all__ = ["LOG_FILE_NAME", "JsonFormatter", "get_logger", "setup_logging"]

LOG_FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.log(\.[0-9]{1,3})?$")
"""The name of a log file: ``<service>.log`` or a rotated ``<service>.log.<n>``."""

_SECRET_MARKERS = ("password", "token", "secret", "api_key", "apikey", "authorization", "cookie")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_encoder = msgspec.json.Encoder()


def _is_secret(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


def redact(value: Any, key: str = "") -> Any:
    """Return ``value`` with secret-looking keys masked, recursively."""
    if key and _is_secret(key):
        return "***"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key != "request_id" and not key.startswith("_"):
                entry[key] = redact(value, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        try:
            return _encoder.encode(entry).decode()
        except (TypeError, msgspec.EncodeError):
            return _encoder.encode({k: str(v) for k, v in entry.items()}).decode()


class _TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")


def setup_logging(
    service: str,
    level: str = "info",
    fmt: str = "json",
    *,
    log_dir: Path | None = None,
    max_bytes: int = 10 * 1024 * 1024,
    backups: int = 5,
) -> None:
    """Route the root logger to stderr in the chosen format, and to ``log_dir/<service>.log``; idempotent.

    A log directory that cannot be written leaves stderr only (said once on stderr).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_dovecote", False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler._dovecote = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else _TextFormatter(service))
    root.addHandler(handler)
    if log_dir is not None and LOG_FILE_NAME.match(f"{service}.log"):
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            rotating = logging.handlers.RotatingFileHandler(
                log_dir / f"{service}.log", maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
        except OSError as exc:
            print(f"dovecote {service}: no log file in {log_dir}: {exc}", file=sys.stderr)
        else:
            rotating._dovecote = True  # type: ignore[attr-defined]
            rotating.setFormatter(JsonFormatter(service))
            root.addHandler(rotating)
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "hpack", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> logging.Logger:
    """Return the logger for a module (``dovecote.<...>``)."""
    return logging.getLogger(name)
