"""Talking to a running suite from the command line (``dovecote outbox``, ...).

The CLI finds the bus the way ``dovecote up`` laid it out: ``DOVECOTE_BUS_*``
when set, else the ipc sockets of the data directory.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from dovecote.bus import Bus, BusEndpoints, open_bus
from dovecote.bus.curve import keypair_from_env
from dovecote.bus.endpoints import ENV_RPC
from dovecote.services.supervisor import bus_socket_dir


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
