"""Fixtures: buses with fast heartbeats (the broker fixtures are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dovecote.bus import Broker, Bus, BusEndpoints, open_bus

HEARTBEAT = 0.1  # seconds; liveness 3 -> a dead peer is noticed within ~0.3-0.4 s


@pytest.fixture
async def bus(endpoints: BusEndpoints, broker: Broker) -> AsyncIterator[Bus]:
    async with open_bus(endpoints, "test", heartbeat=HEARTBEAT) as b:
        yield b
