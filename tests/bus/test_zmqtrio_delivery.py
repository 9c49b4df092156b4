"""zmqtrio's delivery mode: one task hands every incoming message to a callback."""

from __future__ import annotations

import threading

import pytest
import trio
import zmq

from dovecote.bus.zmqtrio import TrioSocket


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _echo_peer(ctx: zmq.Context, addr: str, stop: threading.Event) -> threading.Thread:
    """A real, independent ROUTER echo in another thread."""
    router = ctx.socket(zmq.ROUTER)
    router.bind(addr)

    def run() -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(10):
                router.send_multipart(router.recv_multipart())
        router.close(linger=0)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def test_every_reply_reaches_the_callback_in_order_with_many_senders(ctx):
    stop = threading.Event()
    thread = _echo_peer(ctx, "inproc://deliver-echo", stop)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect("inproc://deliver-echo")
    got: list[bytes] = []
    all_in = trio.Event()
    n = 2000

    def on_message(frames: list[bytes]) -> None:
        got.append(frames[0])
        if len(got) == n:
            all_in.set()

    try:
        async with TrioSocket(dealer) as sock, trio.open_nursery() as nursery:
            nursery.start_soon(sock.deliver, on_message)

            async def sender(k: int) -> None:
                for i in range(n // 4):
                    await sock.send_multipart([b"%d-%d" % (k, i)])

            with trio.fail_after(20):
                for k in range(4):
                    nursery.start_soon(sender, k)
                await all_in.wait()
            with pytest.raises(trio.BusyResourceError):
                await sock.recv_multipart()
            nursery.cancel_scope.cancel()
        for k in range(4):  # each sender's messages in its own order
            mine = [g for g in got if g.startswith(b"%d-" % k)]
            assert mine == [b"%d-%d" % (k, i) for i in range(n // 4)]
    finally:
        stop.set()
        thread.join()


async def test_delivery_starts_while_a_sender_waits_for_the_peer(ctx):
    """A sender waiting for POLLOUT watches the fd; deliver takes the fd over from it."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.immediate = True  # nothing can be sent before the peer is there
    dealer.connect("inproc://deliver-late")
    got = trio.Event()
    stop = threading.Event()
    thread: threading.Thread | None = None
    try:
        async with TrioSocket(dealer) as sock, trio.open_nursery() as nursery:
            sent = trio.Event()

            async def send() -> None:
                await sock.send_multipart([b"hello"])
                sent.set()

            nursery.start_soon(send)
            await trio.sleep(0.05)  # the sender is waiting (no peer yet)
            nursery.start_soon(sock.deliver, lambda frames: got.set())
            await trio.sleep(0.05)
            thread = _echo_peer(ctx, "inproc://deliver-late", stop)
            with trio.fail_after(10):
                await sent.wait()
                await got.wait()
            nursery.cancel_scope.cancel()
    finally:
        stop.set()
        if thread is not None:
            thread.join()


async def test_close_ends_delivery_and_a_failing_callback_drops_only_its_message(ctx, caplog):
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://deliver-close")
    b.connect("inproc://deliver-close")
    got: list[bytes] = []
    second = trio.Event()

    def on_message(frames: list[bytes]) -> None:
        if frames[0] == b"bad":
            raise ValueError("bad message")
        got.append(frames[0])
        second.set()

    async with TrioSocket(a) as sa, TrioSocket(b) as sb:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sb.deliver, on_message)
            await sa.send_multipart([b"bad"])
            await sa.send_multipart([b"good"])
            with trio.fail_after(5):
                await second.wait()
            sb.close()  # deliver returns: the nursery ends on its own
    assert got == [b"good"]
    assert "dropping a message its callback failed on" in caplog.text
