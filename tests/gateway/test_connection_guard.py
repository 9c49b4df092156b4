"""hypercorn's connection handling, hardened so a client cannot stop the gateway."""

from __future__ import annotations

import pytest
import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.tcp_server import TCPServer

from dovecote.gateway.service import GuardedTCPServer, _guard_connections


class _BusySocket:
    """A socket whose other task is shutting it down (send_eof) while we send."""

    async def send_all(self, data: bytes) -> None:
        raise trio.BusyResourceError("another task is using this stream for send")


class _Protocol:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def handle(self, event: object) -> None:
        self.events.append(event)


async def test_a_send_racing_the_close_counts_as_a_gone_client() -> None:
    server = GuardedTCPServer.__new__(GuardedTCPServer)
    server.send_lock = trio.Lock()
    server.stream = _BusySocket()  # type: ignore[assignment]
    protocol = _Protocol()
    server.protocol = protocol  # type: ignore[assignment]
    await server.protocol_send(RawData(data=b"HTTP/1.1 400 \r\n\r\n"))  # does not raise
    assert [type(e) for e in protocol.events] == [Closed]


async def test_a_failing_connection_ends_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    async def raced(self: TCPServer) -> None:
        raise trio.BusyResourceError("another task is using this stream for send")

    monkeypatch.setattr(TCPServer, "run", raced)
    server = GuardedTCPServer.__new__(GuardedTCPServer)
    await server.run()  # logged, not raised into hypercorn's serve


def test_the_gateway_installs_the_guard() -> None:
    _guard_connections()
    assert hypercorn_run.TCPServer is GuardedTCPServer
