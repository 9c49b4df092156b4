"""One idle watcher per keep-alive connection, in place of hypercorn's task per idle period.

hypercorn closes a keep-alive connection that stays idle for
``keep_alive_timeout`` (or at once, when the server is stopping) with a
"single task": every answer's end *starts a new task* that sleeps out the
timeout, and every request's start cancels it. For small requests that
task's start, cancel and exit were about a tenth of the gateway's CPU.

:class:`IdleWatch` keeps hypercorn's interface (``restart`` when the
connection turns idle, ``stop`` when a request begins) and its meaning, but
with one long-lived task per connection whose cancel scope's deadline is
moved instead:

* idle: the deadline is now + ``keep_alive_timeout``; when it passes, or the
  server stops (``context.terminated``), the connection is closed the way
  hypercorn does it (``_initiate_server_close``, shielded);
* busy: no deadline; a server stop waits until the request's answer has been
  sent (the connection turns idle) and then closes it, as hypercorn's does;
* :meth:`end`, when the connection's reader is done (the client hung up, or
  the connection was closed): the watcher ends, so the connection's task
  group can exit and close the socket at once (hypercorn's idle task would
  have kept the connection task, and the socket, around until its timeout).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
from hypercorn.trio.worker_context import TrioSingleTask

__all__ = ["IdleWatch"]


class _Server(Protocol):
    config: Any
    context: Any

    async def _initiate_server_close(self) -> None: ...


class IdleWatch(TrioSingleTask):
    """hypercorn's ``SingleTask`` for the idle timeout, as one task with a movable deadline."""

    def __init__(self, server: _Server) -> None:
        super().__init__()
        self._server = server
        self._started = False
        self._idle = False
        self._deadline = math.inf
        self._scope: trio.CancelScope | None = None  # the current wait, whose deadline moves
        self._life = trio.CancelScope()  # the watcher itself: cancelled by end()
        self._idle_again = trio.Event()

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        """The connection is idle: close it after the keep-alive timeout (``action`` is hypercorn's own)."""
        self._idle = True
        self._set_deadline(trio.current_time() + self._server.config.keep_alive_timeout)
        self._idle_again.set()
        if not self._started:
            self._started = True
            task_group._nursery.start_soon(self._watch)

    async def stop(self) -> None:
        """A request began: no idle timeout until its answer is sent."""
        self._idle = False
        self._set_deadline(math.inf)
        if self._idle_again.is_set():
            self._idle_again = trio.Event()

    def end(self) -> None:
        """The connection is done: the watcher ends without closing anything."""
        self._life.cancel()

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    async def _watch(self) -> None:
        with self._life:
            while True:
                with trio.CancelScope(deadline=self._deadline) as self._scope:
                    await self._server.context.terminated.wait()
                self._scope = None
                if self._idle:
                    break  # idle past the timeout, or idle when the server stops
                await self._idle_again.wait()  # stopping while busy: close once the answer is out
            with trio.CancelScope(shield=True):
                await self._server._initiate_server_close()
