"""Capsule streams on the vmmgr side: bus stream ⇄ guest agent stream.

The gateway opens a bus stream to ``vmmgr.<host_id>`` with one of the start
messages of :mod:`dovecote.bus.messages.capsule_streams`; each handler here
checks the capsule like every operation (:meth:`Capsules.agent_for`: scope,
``running``, connected agent), says so with its first frame, then pipes.

Memory stays bounded at both hops: the bus stream grants ``window`` frames
and the agent its own window of chunks, and each pipe moves one frame at a
time, so a 50 GB file costs a few MiB here. Cancelling the bus stream (the
HTTP client or WebSocket went away) cancels the handler, which cancels the
agent stream: a half-written file is discarded (the agent writes to a temp
file and renames at the end); an exec'd process is killed; a PTY keeps
running until killed (reattach by tag).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, cast

import trio

from dovecote.bus.messages import capsule_streams as cs
from dovecote.bus.messages import capsules as m
from dovecote.bus.stream import Stream
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.agent_ops import agent_errors, check_path
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.guest import AgentClient
from dovecote.vmmgr.guest.client import Exited, Output

log = get_logger("dovecote.vmmgr.streams")

FILE_CHUNK = 256 * 1024
TOUCH_INTERVAL_S = 10.0
"""Bytes per frame of a download (the agent's chunk size)."""


class CapsuleStreams:
    """The stream handlers of one vmmgr (on top of its :class:`Capsules`)."""

    def __init__(self, capsules: Capsules) -> None:
        self.capsules = capsules

    def register(self, handle_stream: Callable[[type, Any], None]) -> None:
        handle_stream(cs.StreamWriteFile, self.write_file)
        handle_stream(cs.StreamReadFile, self.read_file)
        handle_stream(cs.StreamExec, self.exec)
        handle_stream(cs.StreamProcess, self.process)
        handle_stream(cs.StreamPty, self.pty)

    async def _agent(self, msg: m.CapsuleOp) -> tuple[dict[str, Any], AgentClient]:
        return await self.capsules.agent_of(msg)

    # -- files -------------------------------------------------------------------

    async def write_file(self, msg: cs.StreamWriteFile, stream: Stream) -> None:
        path = check_path(msg.path)
        row, client = await self._agent(msg)
        await stream.send(cs.StreamReady())

        async def chunks() -> AsyncIterator[bytes]:
            async for frame in stream:
                if not isinstance(frame, bytes):
                    raise ServiceError(400, "invalid_request", "a file stream carries bytes")
                if frame:
                    yield frame

        async with agent_errors(row["id"]):
            await client.write_file(path, chunks(), chunk_size=FILE_CHUNK)
        await self.capsules.touch(row["id"])
        await stream.send(m.CapsuleDone())

    async def read_file(self, msg: cs.StreamReadFile, stream: Stream) -> None:
        path = check_path(msg.path)
        row, client = await self._agent(msg)
        async with agent_errors(row["id"]):
            async with client.read_file(path, chunk_size=FILE_CHUNK) as reader:
                await stream.send(cs.FileStreamStarted(size=reader.size))
                async for chunk in reader:
                    await stream.send(chunk)
        await self.capsules.touch(row["id"])

    # -- processes and PTYs --------------------------------------------------------

    async def exec(self, msg: cs.StreamExec, stream: Stream) -> None:
        if not msg.cmd:
            raise ServiceError(400, "invalid_request", "cmd is required")
        row, client = await self._agent(msg)
        async with agent_errors(row["id"]):
            started = await client.start_process(msg.cmd, args=msg.args, env=msg.envs,
                                                 cwd=msg.cwd, user=msg.user)
        exited = False
        try:
            exited = await self._follow(row["id"], client, started.tag, stream)
        finally:
            if not exited and client.connected:  # the caller left or stopped: no orphan
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    try:
                        await client.kill(started.tag, "SIGKILL")
                    except Exception:
                        log.debug("could not kill an exec stream's process", exc_info=True)

    async def process(self, msg: cs.StreamProcess, stream: Stream) -> None:
        if not msg.selector or len(msg.selector) > 128:
            raise ServiceError(400, "invalid_request", "invalid process selector")
        row, client = await self._agent(msg)
        await self._follow(row["id"], client, msg.selector, stream)

    async def _follow(self, capsule_id: str, client: AgentClient, selector: str,
                      stream: Stream) -> bool:
        """Pipe a process's output to ``stream`` (``ProcStop`` kills it); True once it exited."""
        lock = trio.Lock()

        async def send(message: Any) -> None:
            async with lock:
                await stream.send(message)

        async with agent_errors(capsule_id):
            async with client.stream_process(selector) as events:
                await send(cs.ProcStarted(pid=events.pid, tag=events.tag, offset=events.offset))
                with _single_error():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._controls, client, events.tag, stream, send, False)
                        exited = await self._pipe(events, send)
                        nursery.cancel_scope.cancel()
        return exited

    async def pty(self, msg: cs.StreamPty, stream: Stream) -> None:
        if not (1 <= msg.cols <= 1000 and 1 <= msg.rows <= 1000):
            raise ServiceError(400, "invalid_request", "cols and rows must be between 1 and 1000")
        if msg.connect and not msg.tag:
            raise ServiceError(400, "invalid_request", "connect needs the PTY's tag")
        row, client = await self._agent(msg)
        lock = trio.Lock()

        async def send(message: Any) -> None:
            async with lock:
                await stream.send(message)

        if msg.connect:
            assert msg.tag is not None
            session = client.attach_pty(msg.tag, since=msg.since)
        else:
            session = client.open_pty(msg.cmd or "/bin/bash", args=msg.args, cols=msg.cols,
                                      rows=msg.rows, env=msg.envs, cwd=msg.cwd, user=msg.user)
        async with agent_errors(row["id"]):
            async with session as pty:
                await send(cs.ProcStarted(pid=pty.pid, tag=pty.tag, offset=pty.offset))
                with _single_error():
                    async with trio.open_nursery() as nursery:

                        async def controls_then_detach() -> None:
                            # The caller's EOF means it detached (the WebSocket went away):
                            # its last controls are applied, then the session ends here
                            # and the PTY keeps running in the guest.
                            await self._controls(client, pty.tag, stream, send, True,
                                                 touch=partial(self.capsules.touch, row["id"]))
                            nursery.cancel_scope.cancel()

                        nursery.start_soon(controls_then_detach)
                        await self._pipe(pty, send)
                        nursery.cancel_scope.cancel()
        await self.capsules.touch(row["id"])

    @staticmethod
    async def _pipe(events: AsyncIterator[Output | Exited], send: Callable[[Any], Any]) -> bool:
        async for event in events:
            if isinstance(event, Output):
                await send(cs.ProcOutput(data=event.data, channel=event.channel, offset=event.offset))
            else:
                await send(cs.ProcExit(exit_code=event.exit_code))
                return True
        return False

    @staticmethod
    async def _controls(client: AgentClient, tag: str, stream: Stream,
                        send: Callable[[Any], Any], pty: bool,
                        touch: Callable[[], Awaitable[None]] | None = None) -> None:
        """Apply the caller's control frames until it sends EOF.

        ``touch`` records activity (the inactivity TTL), at most every
        :data:`TOUCH_INTERVAL_S` while the caller types.
        """
        touched = trio.current_time()
        async for frame in stream:
            try:
                if isinstance(frame, cs.PtyInput) and pty:
                    await client.pty_input(tag, frame.data)
                    if touch is not None and trio.current_time() - touched > TOUCH_INTERVAL_S:
                        touched = trio.current_time()
                        await touch()
                elif isinstance(frame, cs.PtyResize) and pty:
                    if not (1 <= frame.cols <= 1000 and 1 <= frame.rows <= 1000):
                        await send(cs.ProcError(message="cols and rows must be between 1 and 1000"))
                        continue
                    await client.pty_resize(tag, frame.cols, frame.rows)
                elif isinstance(frame, (cs.PtyKill, cs.ProcStop)):
                    signal = frame.signal if frame.signal in ("SIGKILL", "SIGTERM") else "SIGKILL"
                    await client.kill(tag, cast(Literal["SIGKILL", "SIGTERM"], signal))
                else:
                    await send(cs.ProcError(message=f"unexpected control {type(frame).__name__}"))
            except ServiceError as exc:
                await send(cs.ProcError(message=exc.message))
            except Exception as exc:  # an agent refusal of one control is not fatal
                if not client.connected:
                    raise
                await send(cs.ProcError(message=str(exc) or type(exc).__name__))


@contextmanager
def _single_error() -> Iterator[None]:
    """Raise a nursery's one real error bare, so ``agent_errors`` can translate it."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []

        def walk(exc: BaseException) -> None:
            if isinstance(exc, BaseExceptionGroup):
                for inner in exc.exceptions:
                    walk(inner)
            else:
                leaves.append(exc)

        walk(group)
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from None
        raise
