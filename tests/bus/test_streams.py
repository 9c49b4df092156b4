"""Streams: ordering, credit backpressure with a slow consumer, errors, lost workers."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from dovecote.bus import Bus, RemoteError, Stream

from .messages_for_tests import Download, Echo, EchoReply

WINDOW = 8
CHUNK = 64 * 1024


async def _no_requests(msg):
    raise RemoteError("unsupported", "streams only")


async def _serve_streams(bus: Bus, nursery: trio.Nursery, handler, service="files") -> None:
    await nursery.start(partial(bus.serve, service, _no_requests, stream_handler=handler))


async def test_slow_consumer_blocks_sender_and_in_flight_stays_within_window(bus: Bus):
    total_frames = 200 * 1024 * 1024 // CHUNK  # 200 MB
    worker_streams: list[Stream] = []

    async def download(start: Download, stream: Stream) -> None:
        worker_streams.append(stream)
        chunk = b"\x00" * start.size
        for _ in range(start.frames):
            await stream.send(chunk)

    async with trio.open_nursery() as nursery:
        with trio.fail_after(40):
            await _serve_streams(bus, nursery, download)
            async with bus.open_stream("files", Download(frames=total_frames, size=CHUNK),
                                       window=WINDOW, timeout=5) as stream:
                # Slow phase: the consumer does not read; the sender must stop at WINDOW.
                await trio.sleep(0.3)
                [sender] = worker_streams
                assert sender.statistics().frames_sent == WINDOW
                assert sender.statistics().send_credits == 0
                consumed = 0
                for _ in range(3):
                    await stream.receive()
                    consumed += 1
                    await trio.sleep(0.05)
                    in_flight = sender.statistics().frames_sent - consumed
                    assert in_flight <= WINDOW
                # Fast phase: read all 200 MB; in flight never exceeds the window.
                received_bytes = consumed * CHUNK
                max_in_flight = 0
                async for data in stream:
                    consumed += 1
                    received_bytes += len(data)
                    max_in_flight = max(max_in_flight,
                                        sender.statistics().frames_sent - consumed)
                assert consumed == total_frames
                assert received_bytes == total_frames * CHUNK
                assert max_in_flight <= WINDOW
                assert stream.statistics().buffered == 0
        nursery.cancel_scope.cancel()


async def test_upload_frames_arrive_in_order_and_worker_replies_on_the_stream(bus: Bus):
    async def upload(start: Echo, stream: Stream) -> None:
        parts = [m.text async for m in stream]
        await stream.send(EchoReply(text=start.text + ":" + ",".join(parts)))

    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await _serve_streams(bus, nursery, upload)
            async with bus.open_stream("files", Echo(text="up"), window=2) as stream:
                for i in range(50):
                    await stream.send(Echo(text=str(i)))
                await stream.send_eof()
                reply = await stream.receive()
                with pytest.raises(trio.EndOfChannel):
                    await stream.receive()
        nursery.cancel_scope.cancel()
    assert reply == EchoReply(text="up:" + ",".join(str(i) for i in range(50)))


async def test_stream_handler_error_reaches_the_reader_after_earlier_frames(bus: Bus):
    async def failing(start: Echo, stream: Stream) -> None:
        await stream.send(b"first")
        raise ValueError("disk on fire")

    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await _serve_streams(bus, nursery, failing)
            async with bus.open_stream("files", Echo()) as stream:
                assert await stream.receive() == b"first"
                with pytest.raises(RemoteError) as err:
                    await stream.receive()
        nursery.cancel_scope.cancel()
    assert err.value.code == "internal" and "disk on fire" in err.value.message


async def test_stream_fails_with_worker_lost_when_worker_stops(bus: Bus):
    async def forever(start: Echo, stream: Stream) -> None:
        await stream.send(b"hello")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            worker = trio.CancelScope()

            async def run_worker(task_status=trio.TASK_STATUS_IGNORED) -> None:
                with worker:
                    await bus.serve("files", _no_requests, stream_handler=forever,
                                    task_status=task_status)

            await nursery.start(run_worker)
            async with bus.open_stream("files", Echo()) as stream:
                assert await stream.receive() == b"hello"
                worker.cancel()
                with pytest.raises(RemoteError) as err:
                    await stream.receive()
    assert err.value.code == "worker_lost"


async def test_stream_to_worker_without_stream_handler_is_refused(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(bus.serve, "plain", _no_requests)
            with pytest.raises(RemoteError) as err:
                async with bus.open_stream("plain", Echo()):
                    pass
        nursery.cancel_scope.cancel()
    assert err.value.code == "unsupported"
