"""Per-task context that crosses process boundaries.

The request id is set at the edge (the gateway, or a CLI command), copied into
every bus envelope by the bus client and restored by the bus worker before the
handler runs, and added to every structured log line. Trio tasks inherit
context variables from the task that spawned them, so a nursery started under
a request keeps its id.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("dovecote_request_id", default=None)


def new_request_id() -> str:
    """Return a fresh random request id (16 hex characters)."""
    return secrets.token_hex(8)


@contextlib.contextmanager
def bind_request_id(value: str | None) -> Iterator[str]:
    """Set the current request id (a new one when ``value`` is empty) for a block."""
    rid = value or new_request_id()
    token = request_id.set(rid)
    try:
        yield rid
    finally:
        request_id.reset(token)
