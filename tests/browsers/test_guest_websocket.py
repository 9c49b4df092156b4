"""The VM provider's DevTools WebSocket over a byte stream (``services/browsers/vm.py``).

:class:`GuestWebSocket` speaks the WebSocket client side over the frames of a
``StreamTcp`` bus stream; here the stream is an in-memory pair and the other
end a real wsproto server, so the framing is checked without a VM: the
handshake, messages both ways in order, a message split across frames and
chunks, a ping answered, the server's close.
"""

from __future__ import annotations

import contextlib
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request, TextMessage

from dovecote.services.browsers.host import BrowserGone
from dovecote.services.browsers.vm import GuestWebSocket


class FakeStream:
    """One end of a bus stream of ``bytes`` frames (EOF is ``trio.EndOfChannel``)."""

    def __init__(self, send: trio.MemorySendChannel[bytes],
                 receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._send, self._receive = send, receive

    async def send(self, data: bytes) -> None:
        await self._send.send(data)

    async def receive(self) -> bytes:
        return await self._receive.receive()


class Server:
    """A wsproto server on the other end; ``events`` are what it received."""

    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.messages: list[str] = []
        self.pongs = 0

    async def serve(self) -> None:
        with contextlib.suppress(trio.EndOfChannel):
            while True:
                self.ws.receive_data(await self.stream.receive())
                for event in self.ws.events():
                    if isinstance(event, Request):
                        assert event.target == "/devtools/browser/abc"
                        await self.stream.send(self.ws.send(AcceptConnection()))
                    elif isinstance(event, TextMessage):
                        self.messages.append(event.data)
                    elif isinstance(event, Pong):
                        self.pongs += 1

    async def send(self, event: Any) -> None:
        await self.stream.send(self.ws.send(event))


def pair() -> tuple[FakeStream, FakeStream]:
    a_send, b_receive = trio.open_memory_channel[bytes](16)
    b_send, a_receive = trio.open_memory_channel[bytes](16)
    return FakeStream(a_send, a_receive), FakeStream(b_send, b_receive)


async def connect(client_end: FakeStream) -> GuestWebSocket:
    conn = GuestWebSocket(client_end, AsyncExitStack())
    await conn._write(conn._ws.send(Request(host="127.0.0.1:9222", target="/devtools/browser/abc")))
    while not conn._accepted:
        await conn._pump()
    return conn


async def test_messages_go_both_ways_in_order_and_split_messages_are_joined() -> None:
    client_end, server_end = pair()
    server = Server(server_end)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            conn = await connect(client_end)
            for i in range(50):
                await conn.send(f'{{"id": {i}}}'.encode())
            await server.send(TextMessage(data='{"id": 1, "result": ', message_finished=False))
            await server.send(Ping(payload=b"are you there"))
            await server.send(TextMessage(data='{"a": "\u00e9"}}', message_finished=True))
            await server.send(TextMessage(data='{"method": "Page.loadEventFired"}'))
            assert await conn.receive() == '{"id": 1, "result": {"a": "\u00e9"}}'.encode()
            assert await conn.receive() == b'{"method": "Page.loadEventFired"}'
            await trio.sleep(0.1)
            assert server.messages == [f'{{"id": {i}}}' for i in range(50)]
            assert server.pongs == 1
            await server.send(CloseConnection(code=1000))
            with pytest.raises(BrowserGone):
                await conn.receive()
            nursery.cancel_scope.cancel()


async def test_the_end_of_the_stream_is_a_gone_browser() -> None:
    client_end, server_end = pair()
    server = Server(server_end)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            conn = await connect(client_end)
            await server_end._send.aclose()
            with pytest.raises(BrowserGone):
                await conn.receive()
            nursery.cancel_scope.cancel()
