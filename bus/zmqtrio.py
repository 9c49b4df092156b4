"""The one place where pyzmq sockets meet Trio.

pyzmq has no Trio integration.  A zmq socket exposes one file descriptor
(``sock.FD``) that becomes readable when *something* may have changed, and it is
edge-triggered: any ``send``/``recv``/``getsockopt(EVENTS)`` on the socket may
consume the edge.  The naive adapter ("wait_readable(fd), then recv") therefore
hangs: task A waits in recv; task B sends on the same socket, which processes
the pending commands and consumes the edge announcing A's incoming message; A
sleeps forever on a message that is already queued.

The rules this module follows:

1. Always try the operation with ``NOBLOCK`` first; wait only on ``zmq.Again``.
2. Before sleeping, look at ``zmq.EVENTS``: if the direction is ready, retry.
3. Only one task at a time sleeps in ``wait_readable(fd)`` (Trio forbids two
   waiters on one fd).  Others wait on a Trio event that is set whenever the
   fd watcher wakes up or gives up its post.
4. After *every* send and recv, look at ``zmq.EVENTS`` and, if a waiter of
   either direction could now proceed, kick it: cancel the fd watcher's
   private cancel scope and wake the event waiters, so they re-check
   ``EVENTS`` instead of sleeping on a consumed edge.

Receivers are serialized by one lock and senders by another, so multipart
messages never interleave.  A multipart send is atomic in libzmq once its
first frame is accepted, so a ``NOBLOCK`` send either sends all frames or none.
Closing (or cancelling out of ``async with``) closes the socket with
``linger=0`` after telling Trio the fd is going away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio
import zmq

__all__ = ["TrioSocket"]

_Frames = Sequence[bytes | memoryview | zmq.Frame]


class TrioSocket:
    """A pyzmq socket with Trio-friendly async ``send_multipart``/``recv_multipart``.

    Args:
        sock: A pyzmq socket (not shared with other threads). The wrapper owns it.

    Use as ``async with TrioSocket(sock) as s:`` or call :meth:`close`.
    """

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.socket = sock
        self._fd: int = int(sock.getsockopt(zmq.FD))
        self._recv_lock = trio.Lock()
        self._send_lock = trio.Lock()
        self._watch_scope: trio.CancelScope | None = None
        self._changed = trio.Event()
        self._waiting = 0  # tasks inside _wait_for
        self._closed = False

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> TrioSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, linger: int = 0) -> None:
        """Close the socket now; tasks blocked on it get ``trio.ClosedResourceError``."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._fd)
        self._notify()
        self.socket.close(linger=linger)

    # -- waiting -------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _kick(self) -> None:
        """After an operation: wake waiters if the socket is ready in some direction."""
        if not self._waiting:
            return
        if self.socket.getsockopt(zmq.EVENTS):
            if self._watch_scope is not None:
                self._watch_scope.cancel()
            self._notify()

    async def _wait_for(self, mask: int) -> bool:
        """Wait until EVENTS has ``mask``; return True if this task yielded."""
        slept = False
        self._waiting += 1
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket closed")
                if int(self.socket.getsockopt(zmq.EVENTS)) & mask:
                    return slept
                slept = True
                if self._watch_scope is not None:
                    # Someone else watches the fd; they notify us when they wake.
                    await self._changed.wait()
                    continue
                with trio.CancelScope() as scope:
                    self._watch_scope = scope
                    try:
                        await trio.lowlevel.wait_readable(self._fd)
                    finally:
                        self._watch_scope = None
                        self._notify()
        finally:
            self._waiting -= 1

    # -- operations ----------------------------------------------------------

    async def send_multipart(self, frames: _Frames, copy: bool = True) -> None:
        """Send one multipart message, waiting (cancellably) while the socket is full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        async with self._send_lock:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket closed")
                try:
                    self.socket.send_multipart(frames, zmq.NOBLOCK, copy=copy)
                except zmq.Again:
                    waited = await self._wait_for(zmq.POLLOUT) or waited
                    continue
                break
            self._kick()
        if not waited:  # we already yielded while waiting: that was the schedule point
            await trio.lowlevel.cancel_shielded_checkpoint()

    def send_multipart_nowait(self, frames: _Frames, copy: bool = True) -> None:
        """Send without waiting; raises ``trio.WouldBlock`` if the socket is full."""
        if self._closed:
            raise trio.ClosedResourceError("socket closed")
        if self._send_lock.locked():
            raise trio.WouldBlock
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            raise trio.WouldBlock from None
        self._kick()

    async def recv_multipart(self, copy: bool = True) -> list[Any]:
        """Receive one multipart message, waiting (cancellably) until one arrives."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        async with self._recv_lock:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket closed")
                try:
                    frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=copy)
                except zmq.Again:
                    waited = await self._wait_for(zmq.POLLIN) or waited
                    continue
                break
            self._kick()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return frames
