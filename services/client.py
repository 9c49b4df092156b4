"""Talking to a running suite from the command line (``dovecote outbox``, ...).

The CLI finds the bus the way ``dovecote up`` laid it out: ``DOVECOTE_BUS_*``
when set, else the ipc sockets of the data directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from dovecote.bus import Bus, BusEndpoints, BusError, open_bus
from dovecote.bus.curve import keypair_from_env
from dovecote.bus.endpoints import ENV_RPC
from dovecote.bus.messages.base import Message, Request
from dovecote.libs.errors import ServiceError
from dovecote.services.supervisor import bus_socket_dir

R = TypeVar("R", bound=Message)


def suite_endpoints(data_dir: Path) -> BusEndpoints:
    """The bus of the suite whose data directory is ``data_dir``."""
    if os.environ.get(ENV_RPC):
        return BusEndpoints.from_env()
    return BusEndpoints.local(bus_socket_dir(data_dir.resolve()))


@asynccontextmanager
async def open_cli_bus(data_dir: Path) -> AsyncIterator[Bus]:
    """A bus client named ``cli`` on the suite's bus (with this process's CURVE
    keypair, ``DOVECOTE_BUS_CURVE_*``, when the bus has an allow-list)."""
    async with open_bus(suite_endpoints(data_dir), "cli", keypair=keypair_from_env(os.environ)) as bus:
        yield bus


def request_once(data_dir: Path, service: str, message: Request[R], *, command: str,
                 timeout: float = 30.0) -> R | None:
    """Send one request to the running suite from the command line and return its reply.

    A refusal, or a suite that does not answer, is printed to stderr as
    ``dovecote <command>: ...`` and gives None (the caller exits 1).
    """
    import trio

    async def send() -> R:
        async with open_cli_bus(data_dir) as bus:
            return await bus.request(service, message, timeout=timeout)

    reply: R | None = None
    try:
        reply = trio.run(send)
    except* ServiceError as group:
        refused = group.exceptions[0]
        assert isinstance(refused, ServiceError)
        print(f"dovecote {command}: {refused.message} ({refused.code})", file=sys.stderr)
    except* BusError as group:
        print(f"dovecote {command}: the suite does not answer ({group.exceptions[0]}); "
              "is `dovecote up` running?", file=sys.stderr)
    return reply
