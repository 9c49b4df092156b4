"""The pyzmq/Trio adapter on its own, including the case a naive adapter hangs on."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.lowlevel
import zmq

from dovecote.bus.zmqtrio import TrioSocket


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _pair(ctx, a_type=zmq.PAIR, b_type=zmq.PAIR, addr="inproc://t", hwm=1000):
    a = ctx.socket(a_type)
    a.sndhwm = a.rcvhwm = hwm
    a.bind(addr)
    b = ctx.socket(b_type)
    b.sndhwm = b.rcvhwm = hwm
    b.connect(addr)
    return TrioSocket(a), TrioSocket(b)


async def test_send_and_recv_multipart_roundtrip(ctx):
    a, b = _pair(ctx)
    async with a, b:
        with trio.fail_after(5):
            await a.send_multipart([b"x", b"y"])
            assert await b.recv_multipart() == [b"x", b"y"]


async def test_recv_waiter_wakes_when_same_socket_sends_and_reply_arrives(ctx):
    """The naive wait_readable(FD) adapter hangs here: the send consumes the edge."""
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://echo")
    stop = threading.Event()

    def echo() -> None:  # a real, independent peer in another thread
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(10):
                router.send_multipart(router.recv_multipart())
        router.close(linger=0)

    thread = threading.Thread(target=echo)
    thread.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect("inproc://echo")
    try:
        async with TrioSocket(dealer) as sock:
            with trio.fail_after(10):
                for i in range(300):
                    got: list[list[bytes]] = []
                    async with trio.open_nursery() as nursery:

                        async def receiver() -> None:
                            got.append(await sock.recv_multipart())  # noqa: B023

                        nursery.start_soon(receiver)
                        await trio.lowlevel.checkpoint()  # let the receiver block in recv first
                        await sock.send_multipart([b"%d" % i])
                    assert got == [[b"%d" % i]]
    finally:
        stop.set()
        thread.join()


async def test_many_tasks_share_one_socket_both_directions(ctx):
    a, b = _pair(ctx, zmq.DEALER, zmq.DEALER)
    n = 500
    received_a: list[bytes] = []
    received_b: list[bytes] = []

    async def pump(src: TrioSocket, tag: bytes) -> None:
        for i in range(n // 5):
            await src.send_multipart([tag, b"%d" % i])

    async def drain(dst: TrioSocket, into: list[bytes]) -> None:
        while len(into) < n:
            into.append((await dst.recv_multipart())[0])

    async with a, b:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, a, received_a)
                nursery.start_soon(drain, b, received_b)
                for t in range(5):
                    nursery.start_soon(pump, a, b"a%d" % t)
                    nursery.start_soon(pump, b, b"b%d" % t)
    assert len(received_a) == len(received_b) == n


async def test_send_waits_while_full_and_resumes_when_peer_drains(ctx):
    a, b = _pair(ctx, zmq.DEALER, zmq.DEALER, hwm=2)
    async with a, b:
        with trio.fail_after(10):
            sent = 0
            with trio.move_on_after(0.2):
                while True:
                    await a.send_multipart([b"x" * 10])
                    sent += 1
            assert 0 < sent < 100  # blocked at the high-water marks
            async with trio.open_nursery() as nursery:

                async def more() -> None:
                    for _ in range(50):
                        await a.send_multipart([b"y"])

                nursery.start_soon(more)
                for _ in range(sent + 50):
                    await b.recv_multipart()


async def test_cancelled_recv_leaves_socket_usable(ctx):
    a, b = _pair(ctx)
    async with a, b:
        with trio.fail_after(5):
            with trio.move_on_after(0.05) as cs:
                await b.recv_multipart()
            assert cs.cancelled_caught
            await a.send_multipart([b"later"])
            assert await b.recv_multipart() == [b"later"]


async def test_close_wakes_blocked_receiver_with_closed_resource_error(ctx):
    a, b = _pair(ctx)
    async with a:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def receiver() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await b.recv_multipart()

                nursery.start_soon(receiver)
                await trio.sleep(0.01)
                b.close()
    assert b.socket.closed
