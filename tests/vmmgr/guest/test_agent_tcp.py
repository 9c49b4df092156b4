"""The agent's TCP relay (``OpenTcp``) against the REAL agent process and real TCP servers.

The agent (``--listen-unix``) connects to a port on the loopback and relays the
connection's bytes over its channel both ways with credits: order, half close,
refusals, and a fast server with a slow reader that stays within the window.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable

import pytest
import trio

from dovecote.vmmgr.guest import open_agent
from dovecote.vmmgr.guest import protocol as P
from dovecote.vmmgr.guest.errors import AgentRequestError, PermissionDenied

from .conftest import RunningAgent


async def serve_once(handler: Callable[[trio.SocketStream], Awaitable[None]], *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    task_status.started(port)
    async with listeners[0]:
        stream = await listeners[0].accept()
        async with stream:
            await handler(stream)


async def echo_until_eof(stream: trio.SocketStream) -> None:
    while True:
        data = await stream.receive_some(65536)
        if not data:
            await stream.send_all(b"bye")
            return
        await stream.send_all(data)


async def test_bytes_go_both_ways_in_order_and_a_half_close_reaches_the_server(agent: RunningAgent) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, open_agent(agent.socket, connect_timeout=10) as client:
            port = await nursery.start(serve_once, echo_until_eof)
            async with client.open_tcp(port) as conn:
                sent = bytearray()
                received = bytearray()
                for i in range(300):
                    message = f"message {i} ".encode() * (i % 7 + 1)
                    await conn.send_all(message)
                    sent += message
                    while len(received) < len(sent):
                        received += await conn.receive_some()
                assert bytes(received) == bytes(sent)
                big = os.urandom(3 * P.CHUNK_SIZE + 17)  # more than one chunk each way
                await conn.send_all(big)
                await conn.send_eof()
                rest = bytearray()
                while True:
                    data = await conn.receive_some()
                    if not data:
                        break
                    rest += data
                assert bytes(rest) == big + b"bye"


async def test_refusals_name_their_reason(agent: RunningAgent) -> None:
    with trio.fail_after(30):
        async with open_agent(agent.socket, connect_timeout=10) as client:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            await listeners[0].aclose()  # nothing listens there now
            with pytest.raises(AgentRequestError) as refused:
                async with client.open_tcp(port):
                    pass
            assert refused.value.code == "connection_refused"
            with pytest.raises(PermissionDenied):
                async with client.open_tcp(80, host="192.0.2.1"):
                    pass
            assert (await client.ping()).protocol == P.PROTOCOL_VERSION  # the connection is fine


async def test_a_fast_server_and_a_slow_reader_stay_within_the_window(agent: RunningAgent) -> None:
    total = 24 * 1024 * 1024
    payload = os.urandom(1024 * 1024)

    async def flood(stream: trio.SocketStream) -> None:
        for _ in range(total // len(payload)):
            await stream.send_all(payload)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, open_agent(agent.socket, connect_timeout=10) as client:
            port = await nursery.start(serve_once, flood)
            async with client.open_tcp(port, window=4) as conn:
                digest = hashlib.sha256()
                got = 0
                while got < total:
                    data = await conn.receive_some()
                    assert data
                    digest.update(data)
                    got += len(data)
                    if got < 4 * 1024 * 1024:
                        await trio.sleep(0.01)  # slow at first: the agent must wait for credits
                stats = conn.statistics()
                assert stats["max_buffered_bytes"] <= 4 * P.CHUNK_SIZE, stats
                assert digest.hexdigest() == hashlib.sha256(payload * (total // len(payload))).hexdigest()
