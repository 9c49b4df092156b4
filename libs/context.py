"""Per-task context that crosses process boundaries.

The request id is set at the edge (the gateway, or a CLI command), copied into
every bus envelope by the bus client and restored by the bus worker before the
handler runs, and added to every structured log line. Trio tasks inherit
context variables from the task that spawned them, so a nursery started under
a request keeps its id.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("dovecote_request_id", default=None)

# A request id correlates logs; it is no secret and proves nothing, so it needs
# no system call per request (the gateway makes one for most requests): a
# process-local generator, seeded from the OS, is enough to keep ids apart.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)  # a forked child draws its own ids


def new_request_id() -> str:
    """Return a fresh random request id (16 hex characters)."""
    return f"{_ids.getrandbits(64):016x}"


@contextlib.contextmanager
def bind_request_id(value: str | None) -> Iterator[str]:
    """Set the current request id (a new one when ``value`` is empty) for a block."""
    rid = value or new_request_id()
    token = request_id.set(rid)
    try:
        yield rid
    finally:
        request_id.reset(token)
