"""The one place where pyzmq sockets meet Trio.

pyzmq has no Trio integration.  A zmq socket exposes one file descriptor
(``sock.FD``) that becomes readable when *something* may have changed, and it is
edge-triggered: any ``send``/``recv``/``getsockopt(EVENTS)`` on the socket may
consume the edge.  The naive adapter ("wait_readable(fd), then recv") therefore
hangs: task A waits in recv; task B sends on the same socket, which processes
the pending commands and consumes the edge announcing A's incoming message; A
sleeps forever on a message that is already queued.

The rules this module follows:

1. Always try the operation without blocking first (a receive looks at
   ``zmq.EVENTS`` instead of provoking ``zmq.Again``); wait only if not ready.
2. Before sleeping, look at ``zmq.EVENTS``: if the direction is ready, retry.
3. Only one task at a time sleeps in ``wait_readable(fd)`` (Trio forbids two
   waiters on one fd).  Others wait on a Trio event that is set whenever the
   fd watcher wakes up or gives up its post.
4. After *every* send and recv while some task waits on the socket, look at
   ``zmq.EVENTS`` and, if a waiter's direction is now ready, kick it: cancel
   the fd watcher's private cancel scope and wake the event waiters, so they
   re-check ``EVENTS`` instead of sleeping on a consumed edge.  (A direction
   that is not ready needs no kick: libzmq signals the fd again when it
   becomes ready.)

Delivery mode, the hot path of the RPC sockets: :meth:`TrioSocket.deliver`
makes one task the socket's only reader and fd watcher, and every incoming
message is handed to a synchronous callback.  Whoever reads ``EVENTS`` and
sees ``POLLIN`` (the watcher after a wake-up, or a sender right after its
send) drains the socket then and there, calling the callback for each queued
message, until ``EVENTS`` shows none.  So the watcher never sleeps on a
consumed edge, nobody has to be kicked (no cancellation per message), a reply
that arrived while its caller was still sending is delivered without a task
switch, and one wake-up takes every message that is ready.  The callback
must not block or raise (it starts tasks, sets values, wakes waiters).

The hot path is cheap: when the socket is ready and no other task queues on
it, an operation is one libzmq call plus a cancellation check, with no lock
and no trip through the scheduler.  To stay fair, every ``_FAIR_EVERY``-th
such operation still yields (a full Trio checkpoint); an operation that had
to wait has yielded anyway.  Frames go through the libzmq binding directly
with integer flags (pyzmq's convenience layer costs microseconds per frame).

Receivers are serialized by one lock and senders by another, so multipart
messages never interleave.  A multipart send is atomic in libzmq once its
first frame is accepted, so a ``NOBLOCK`` send either sends all frames or none.
Closing (or cancelling out of ``async with``) closes the socket with
``linger=0`` after telling Trio the fd is going away.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio
import zmq
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled

__all__ = ["TrioSocket"]

log = logging.getLogger("dovecote.bus.zmqtrio")

_Frames = Sequence[bytes | memoryview | zmq.Frame]

_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS = zmq.EVENTS  # the enum member: the binding converts options to it anyway
_RCVMORE = zmq.RCVMORE
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_FAIR_EVERY = 16  # fast-path operations between forced schedule points

# The binding's own methods: same semantics as pyzmq's Socket.send/recv/get,
# without the convenience layer (flag enums, routing_id/group handling).
_base_send: Any = zmq.backend.Socket.send
_base_recv: Any = zmq.backend.Socket.recv
_base_get: Any = zmq.backend.Socket.get


def _send_frames(sock: zmq.Socket[Any], frames: _Frames, copy: bool) -> None:
    """Send all frames with NOBLOCK (atomic: libzmq queues all or none)."""
    last = len(frames) - 1
    if last < 0:
        raise ValueError("cannot send an empty multipart message")
    for i in range(last):
        _base_send(sock, frames[i], _SNDMORE_NOBLOCK, copy)
    _base_send(sock, frames[last], _NOBLOCK, copy)


def _recv_frames(sock: zmq.Socket[Any], copy: bool) -> list[Any]:
    parts = [_base_recv(sock, _NOBLOCK, copy)]
    while _base_get(sock, _RCVMORE):
        parts.append(_base_recv(sock, _NOBLOCK, copy))
    return parts


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
        self._recv_waiting = 0  # tasks inside _wait_for(POLLIN)
        self._send_waiting = 0  # tasks inside _wait_for(POLLOUT)
        self._fair = _FAIR_EVERY
        self._closed = False
        self._on_message: Callable[[list[Any]], None] | None = None  # delivery mode
        self._draining = False

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

    def _events(self) -> int:
        """Read ``EVENTS``; kick waiters whose direction it shows ready.

        Reading ``EVENTS`` processes libzmq's pending commands and so may
        consume the fd's edge that a sleeping waiter (of either direction)
        relies on: whoever reads it hands the news on.
        """
        events: int = _base_get(self.socket, _EVENTS)
        if events & _POLLIN and self._on_message is not None and not self._draining:
            events = self._drain()
        if (self._recv_waiting and events & _POLLIN) or (self._send_waiting and events & _POLLOUT):
            if self._watch_scope is not None:
                self._watch_scope.cancel()
            self._notify()
        return events

    def _kick(self) -> None:
        """After an operation: deliver what came in, wake waiters whose direction is now ready."""
        if self._on_message is not None or self._recv_waiting or self._send_waiting:
            self._events()

    def _drain(self) -> int:
        """Delivery mode: hand every queued message to the callback; the last ``EVENTS``."""
        on_message = self._on_message
        assert on_message is not None
        sock = self.socket
        self._draining = True
        try:
            while True:
                try:
                    frames = _recv_frames(sock, True)
                except zmq.Again:  # (EVENTS said POLLIN; a spurious one is harmless)
                    pass
                else:
                    try:
                        on_message(frames)
                    except Exception:
                        log.exception("dropping a message its callback failed on")
                    if self._closed:
                        return 0
                events: int = _base_get(sock, _EVENTS)
                if not events & _POLLIN:
                    return events
        finally:
            self._draining = False

    async def deliver(self, on_message: Callable[[list[Any]], None]) -> None:
        """Hand every incoming message to ``on_message(frames)``, in order, until closed.

        The calling task becomes the socket's only reader (``recv_multipart``
        is refused meanwhile); it returns when the socket is closed.
        ``on_message`` runs synchronously, in this task or in a task that just
        sent on the socket: it must not block, and an exception it raises is
        logged and the message dropped.
        """
        if self._on_message is not None or self._recv_lock.locked():
            raise trio.BusyResourceError("another task receives on this socket")
        self._on_message = on_message
        try:
            while self._watch_scope is not None:  # a sender waiting for POLLOUT watches the fd:
                self._watch_scope.cancel()  # it hands the fd over and waits on _changed
                await self._changed.wait()
            while not self._closed:
                if self._events() & _POLLIN:  # (a drain stopped by close)
                    continue
                try:
                    await trio.lowlevel.wait_readable(self._fd)
                except trio.ClosedResourceError:
                    return
                if self._send_waiting:
                    self._notify()
            await trio.lowlevel.checkpoint()
        finally:
            self._on_message = None

    async def _schedule_point(self) -> None:
        """The fast path's checkpoint: yield to the scheduler every few operations."""
        self._fair -= 1
        if self._fair <= 0:
            self._fair = _FAIR_EVERY
            await cancel_shielded_checkpoint()

    async def _wait_for(self, mask: int, checked: bool = False) -> None:
        """Sleep until ``EVENTS`` has ``mask`` (``checked``: the caller just saw it unset)."""
        if mask == _POLLIN:
            self._recv_waiting += 1
        else:
            self._send_waiting += 1
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket closed")
                if checked:
                    checked = False
                elif self._events() & mask:
                    return
                if self._watch_scope is not None or self._on_message is not None:
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
            if mask == _POLLIN:
                self._recv_waiting -= 1
            else:
                self._send_waiting -= 1

    # -- operations ----------------------------------------------------------

    async def send_multipart(self, frames: _Frames, copy: bool = True) -> None:
        """Send one multipart message, waiting (cancellably) while the socket is full."""
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("socket closed")
        lock = self._send_lock
        if not lock.locked():  # nobody queued: try right away
            try:
                _send_frames(self.socket, frames, copy)
            except zmq.Again:
                self._kick()  # the attempt may have consumed a waiter's edge
            else:
                self._kick()
                await self._schedule_point()
                return
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket closed")
                try:
                    _send_frames(self.socket, frames, copy)
                except zmq.Again:
                    await self._wait_for(_POLLOUT)
                    continue
                break
            self._kick()
        finally:
            lock.release()

    def send_multipart_nowait(self, frames: _Frames, copy: bool = True) -> None:
        """Send without waiting; raises ``trio.WouldBlock`` if the socket is full."""
        if self._closed:
            raise trio.ClosedResourceError("socket closed")
        if self._send_lock.locked():
            raise trio.WouldBlock
        try:
            _send_frames(self.socket, frames, copy)
        except zmq.Again:
            self._kick()
            raise trio.WouldBlock from None
        self._kick()

    async def recv_multipart(self, copy: bool = True) -> list[Any]:
        """Receive one multipart message, waiting (cancellably) until one arrives."""
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("socket closed")
        if self._on_message is not None:
            raise trio.BusyResourceError("the socket delivers its messages to a callback")
        lock = self._recv_lock
        checked = False
        if not lock.locked():  # nobody queued: take a ready message right away
            if self._events() & _POLLIN:
                try:
                    frames = _recv_frames(self.socket, copy)
                except zmq.Again:
                    self._kick()
                else:
                    self._kick()
                    await self._schedule_point()
                    return frames
            else:
                checked = True
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
            checked = False
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket closed")
                if not checked:
                    try:
                        frames = _recv_frames(self.socket, copy)
                    except zmq.Again:
                        pass
                    else:
                        break
                await self._wait_for(_POLLIN, checked)
                checked = False
            self._kick()
        finally:
            lock.release()
        return frames
