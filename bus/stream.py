"""Ordered, flow-controlled streams over the RPC plane.

A stream is opened like a request (to a service name, through the broker)
and then carries DATA frames both ways, each with a sequence number, until
each side says EOF; the worker's CLOSE ends it.  Flow control is by credit:
a side may only send as many DATA frames as the receiver has granted.  The
receiver grants ``window`` credits up front and grants more as the
application *consumes* frames (half a window at a time), so a slow consumer
stops the sender after at most ``window`` frames in flight, and memory stays
bounded whatever the stream's total size.

:class:`Stream` is the same object on both ends; it does no socket I/O itself
(it gets a ``send_frame`` coroutine function and is fed incoming frames).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from . import protocol as P
from .errors import PROTOCOL, BusClosed, RemoteError
from .messages.base import Message, decode, encode
from .messages.common import Failure, refusal

SendFrame = Callable[[bytes, int, bytes], Awaitable[None]]


@dataclass
class StreamStatistics:
    """Counters of one stream end (see :meth:`Stream.statistics`)."""

    frames_sent: int
    frames_received: int
    frames_consumed: int
    send_credits: int
    buffered: int


class Stream:
    """One end of a stream: ``send``/``receive`` plus ``async for``.

    Created by :meth:`Bus.open_stream` (caller side) or handed to the stream
    handler given to :meth:`Bus.serve` (worker side).
    """

    def __init__(self, send_frame: SendFrame, *, window: int, send_credits: int) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._send_frame = send_frame
        self.window = window
        self._credits = send_credits
        self._inbox: deque[tuple[bytes, bytes]] = deque()
        self._changed = trio.Event()
        self._send_seq = 0
        self._recv_seq = 0
        self._consumed = 0
        self._ungranted = 0
        self._eof_sent = False
        self._peer_eof = False
        self._peer_gone = False
        self._error: RemoteError | None = None
        self._accepted = send_credits > 0
        self.cancel_scope: trio.CancelScope | None = None  # worker: cancelled on CANCEL

    # -- fed by the bus's receiver task ------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _feed(self, kind: bytes, seq: int, payload: bytes) -> None:
        if kind in (P.DATA_BYTES, P.DATA_MSG):
            if self._peer_eof:
                return
            if seq != self._recv_seq + 1:
                self._fail(RemoteError(PROTOCOL, f"stream frame {seq} after {self._recv_seq}"))
                return
            self._recv_seq = seq
            self._inbox.append((kind, payload))
        elif kind == P.CREDIT:
            self._credits += seq
            self._accepted = True
        elif kind == P.EOF:
            self._peer_eof = True
            if payload:
                err = P.decode_error(payload)
                self._error = RemoteError(err.code, err.message)
        elif kind in (P.CLOSE, P.CANCEL):
            self._peer_eof = True
            self._peer_gone = True
            if payload:
                err = P.decode_error(payload)
                self._error = RemoteError(err.code, err.message)
            if kind == P.CANCEL and self.cancel_scope is not None:
                self.cancel_scope.cancel()
        self._wake()

    def _fail(self, error: RemoteError) -> None:
        self._error = error
        self._peer_eof = self._peer_gone = True
        self._wake()

    # -- application API ----------------------------------------------------------

    @property
    def peer_closed(self) -> bool:
        """True once the other end has finished (CLOSE/CANCEL) or failed."""
        return self._peer_gone

    async def _wait_accepted(self) -> None:
        while not self._accepted:
            if self._peer_gone:
                raise self._error or BusClosed("stream refused")
            await self._changed.wait()

    async def send(self, data: bytes | Message) -> None:
        """Send one frame, waiting for credit while the receiver is behind.

        Raises:
            BusClosed: this end already sent EOF, or the peer is gone.
            RemoteError: the peer ended the stream with an error (e.g. ``worker_lost``).
        """
        if self._eof_sent:
            raise BusClosed("stream: send after send_eof")
        while self._credits <= 0:
            if self._peer_gone:
                raise self._error or BusClosed("stream closed by peer")
            await self._changed.wait()
        if self._peer_gone:
            raise self._error or BusClosed("stream closed by peer")
        if isinstance(data, Message):
            kind, payload = P.DATA_MSG, encode(data)
        else:
            kind, payload = P.DATA_BYTES, bytes(data) if not isinstance(data, bytes) else data
        self._credits -= 1
        self._send_seq += 1
        await self._send_frame(kind, self._send_seq, payload)

    async def send_eof(self, error: RemoteError | None = None) -> None:
        """Tell the peer this end will send no more (optionally with an error)."""
        if self._eof_sent or self._peer_gone:
            self._eof_sent = True
            return
        self._eof_sent = True
        payload = P.encode_error(error.code, error.message) if error else b""
        await self._send_frame(P.EOF, 0, payload)

    async def receive(self) -> bytes | Message:
        """Return the next frame (bytes, or a decoded Message).

        Raises:
            trio.EndOfChannel: the peer sent EOF (after all earlier frames).
            ServiceError: the worker refused (its handler raised it); the
                stream ends after it.
            RemoteError: the peer ended with an error, or was lost.
        """
        while not self._inbox:
            if self._peer_eof:
                if self._error is not None:
                    raise self._error
                raise trio.EndOfChannel
            await self._changed.wait()
        kind, payload = self._inbox.popleft()
        self._consumed += 1
        self._ungranted += 1
        if self._ungranted >= max(1, self.window // 2) and not self._peer_gone:
            grant, self._ungranted = self._ungranted, 0
            await self._send_frame(P.CREDIT, grant, b"")
        else:
            await trio.lowlevel.checkpoint()
        if kind != P.DATA_MSG:
            return payload
        msg = decode(payload)
        if type(msg) is Failure:  # the worker's refusal: its last frame
            raise refusal(msg)
        return msg

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> bytes | Message:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def statistics(self) -> StreamStatistics:
        """Counters: frames sent/received/consumed, credits left, frames buffered."""
        return StreamStatistics(self._send_seq, self._recv_seq, self._consumed, self._credits,
                                len(self._inbox))
