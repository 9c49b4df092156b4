"""The channel to the host: a byte pipe, framing, streams with credits.

A *session* is one host connection: it owns a frame decoder, a writer task, the
requests in flight and the streams attached to them. When the channel reports
EOF (the host side of a virtio-serial port is not connected: reads return 0 or
EIO and poll reports POLLHUP) the session ends and its tasks are cancelled;
what the agent started keeps running.

Channel I/O runs in two threads per session (poll + non-blocking read/write on
one file descriptor), because a character device and a socket then behave the
same and a stuck write never blocks the loop. Every wait in those threads polls
with a short timeout so a session can be stopped.

:class:`Session` routes the host's stream messages (credits, cancels, upload
chunks) itself and hands every request to its ``handler`` (the dispatcher) in a
task of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import protocol as P
from .errors import AgentError

READ_SIZE = 256 * 1024
POLL_MS = 200

log = logging.getLogger("dovecote-agent")

Handler = Callable[["Session", P.Request], Awaitable[None]]
"""Answers one request on a session (sends its reply or streams itself)."""


class FdChannel:
    """Blocking-with-timeout read/write on one non-blocking fd (socket or character device)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.stopped = threading.Event()
        os.set_blocking(fd, False)

    def stop(self) -> None:
        self.stopped.set()

    def read(self) -> bytes:
        """Next bytes, or b"" at EOF / when the host end is not connected / after stop()."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLPRI)
        while not self.stopped.is_set():
            events = poller.poll(POLL_MS)
            if not events:
                continue
            revents = events[0][1]
            if revents & (select.POLLIN | select.POLLPRI):
                try:
                    return os.read(self.fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:  # EIO and friends: the host side went away
                    return b""
            if revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return b""
        return b""

    def write(self, data: bytes) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        view = memoryview(data)
        while view:
            if self.stopped.is_set():
                raise ConnectionError("channel stopped")
            try:
                view = view[os.write(self.fd, view) :]
                continue
            except BlockingIOError:
                pass
            for _, revents in poller.poll(POLL_MS):
                if (
                    revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
                    and not revents & select.POLLOUT
                ):
                    raise ConnectionError("host end disconnected")


class OutStream:
    """Agent → host stream with the host's credits."""

    def __init__(self, session: Session, stream: int, window: int) -> None:
        self.session = session
        self.stream = stream
        self.window = P.SendWindow(max(1, min(window, P.MAX_WINDOW)))
        self._credit = asyncio.Event()

    def grant(self, credits: int) -> None:
        self.window.grant(credits)
        self._credit.set()

    async def wait_credit(self) -> None:
        while not self.window.can_send():
            self._credit.clear()
            await self._credit.wait()

    async def chunk(self, data: bytes, **fields: Any) -> None:
        await self.wait_credit()
        seq = self.window.take()
        await self.session.send(P.Chunk(stream=self.stream, seq=seq, data=data, **fields))

    async def end(self, exit_code: int | None = None, error: P.ErrorInfo | None = None) -> None:
        await self.session.send(
            P.StreamEnd(stream=self.stream, seq=self.window.next_seq, exit_code=exit_code, error=error)
        )


class Session:
    """One host connection."""

    def __init__(self, handler: Handler, fd: int) -> None:
        self.handler = handler
        self.channel = FdChannel(fd)
        self.decoder = P.FrameDecoder()
        self.out: asyncio.Queue[bytes] = asyncio.Queue(maxsize=32)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.streams: dict[int, OutStream] = {}
        self.stream_tasks: dict[int, asyncio.Task[Any]] = {}
        self.uploads: dict[int, asyncio.Queue[P.Chunk | P.StreamEnd | None]] = {}
        self.received = 0

    async def send(self, message: P.Message) -> None:
        await self.out.put(P.encode_frame(message))

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def run(self) -> int:
        """Serve until EOF or a protocol error; return the number of bytes received."""
        loop = asyncio.get_running_loop()
        reader = ThreadPoolExecutor(1, thread_name_prefix="agent-read")
        writer_pool = ThreadPoolExecutor(1, thread_name_prefix="agent-write")

        async def write_loop() -> None:
            try:
                while True:
                    data = await self.out.get()
                    await loop.run_in_executor(writer_pool, self.channel.write, data)
            except (ConnectionError, OSError) as exc:
                log.info("session write failed: %s", exc)
                self.channel.stop()

        writer = asyncio.ensure_future(write_loop())
        try:
            while True:
                data = await loop.run_in_executor(reader, self.channel.read)
                if not data:
                    break
                self.received += len(data)
                for body in self.decoder.feed(data):
                    self.dispatch(P.decode_host_message(body))
        except P.ProtocolError as exc:
            log.warning("protocol error, dropping the session: %s", exc)
        finally:
            self.channel.stop()
            for task in [*self.tasks, writer]:
                task.cancel()
            await asyncio.gather(*self.tasks, writer, return_exceptions=True)
            reader.shutdown(wait=False)
            writer_pool.shutdown(wait=False)
        return self.received

    def dispatch(self, msg: P.HostMessage) -> None:
        if isinstance(msg, P.Credit):
            stream = self.streams.get(msg.stream)
            if stream is not None:
                stream.grant(msg.credits)
        elif isinstance(msg, P.Cancel):
            task = self.stream_tasks.get(msg.stream)
            if task is not None:
                task.cancel()
            upload = self.uploads.get(msg.stream)
            if upload is not None:
                upload.put_nowait(None)
        elif isinstance(msg, (P.Chunk, P.StreamEnd)):
            queue = self.uploads.get(msg.stream)
            if queue is not None:  # else: an upload that already failed; drop
                queue.put_nowait(msg)
        else:
            self.spawn(self.handler(self, msg))

    # ----- streams

    def open_stream(self, stream_id: int, window: int) -> OutStream:
        if stream_id in self.streams or stream_id in self.uploads:
            raise AgentError("invalid_argument", f"stream {stream_id} is already open")
        stream = OutStream(self, stream_id, window)
        self.streams[stream_id] = stream
        task = asyncio.current_task()
        assert task is not None
        self.stream_tasks[stream_id] = task
        return stream

    def close_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.stream_tasks.pop(stream_id, None)
