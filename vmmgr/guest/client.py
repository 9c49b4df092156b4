"""Host side of the guest-agent protocol (Trio).

``open_agent`` connects to the unix socket libvirt exposes for the capsule's
virtio-serial port, handshakes with a ping, and runs one reader task that
dispatches frames: replies by request id, stream frames by stream id.  Calls
are multiplexed over the one connection; writes are serialized by a lock.

Every wait is bounded: requests by ``request_timeout`` (exec by its own
timeout plus a grace), file chunks and upload credits by an idle timeout.
Live process and PTY streams wait for output as long as the caller likes, but
they fail with :class:`AgentConnectionLost` the moment the connection does.

Streams hold at most ``window`` chunks: the client grants a credit back only
when the caller consumed a chunk, so a slow caller slows the agent instead of
growing a buffer.

Example::

    async with open_agent("/run/dovecote/capsule-1/agent.sock") as agent:
        result = await agent.exec("echo hello", timeout=10)
        async with agent.open_pty(cols=120, rows=40) as pty:
            await pty.send_input(b"ls\\n")
            async for event in pty:
                ...
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import trio

from . import protocol as P
from .errors import (
    AgentConnectError,
    AgentConnectionLost,
    AgentProtocolError,
    AgentTimeout,
    request_error,
)

__all__ = [
    "AgentClient",
    "Exited",
    "FileReader",
    "Output",
    "ProcessStream",
    "PtySession",
    "TcpStream",
    "open_agent",
]

EXEC_GRACE = 10.0
"""Extra seconds a foreground exec may take over its own timeout (kill, drain, reply)."""

_R = TypeVar("_R", bound=P.Message)


@dataclass(frozen=True)
class Output:
    """Output of a process or PTY. ``channel`` is "stdout", "stderr" or "" (PTY)."""

    data: bytes
    channel: str
    offset: int
    skipped: int = 0


@dataclass(frozen=True)
class Exited:
    """The process or PTY exited (``exit_code`` is 128 + n after signal n)."""

    exit_code: int | None


class _Incoming:
    """Agent → host stream: chunks land here; the caller consumes them and grants credits."""

    def __init__(self, stream_id: int, window: int) -> None:
        self.stream_id = stream_id
        self.window = P.ReceiveWindow(window)
        self.send, self.receive = trio.open_memory_channel[P.Chunk | P.StreamEnd](math.inf)
        self.error: BaseException | None = None
        self.buffered_bytes = 0
        self.max_buffered_bytes = 0

    def push(self, msg: P.Chunk | P.StreamEnd) -> None:
        if isinstance(msg, P.Chunk):
            self.window.receive(msg.seq)
            self.buffered_bytes += len(msg.data)
            self.max_buffered_bytes = max(self.max_buffered_bytes, self.buffered_bytes)
        else:
            self.window.end(msg.seq)
        self.send.send_nowait(msg)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.send.close()


class _Outgoing:
    """Host → agent stream (upload): the agent's credits."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.window = P.SendWindow(0)
        self.changed = trio.Event()
        self.error: BaseException | None = None

    def grant(self, credits: int) -> None:
        self.window.grant(credits)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class AgentClient:
    """One connection to a guest agent; make it with :func:`open_agent`."""

    def __init__(self, stream: trio.abc.Stream, *, request_timeout: float = 30.0) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._replies: dict[int, trio.MemorySendChannel[P.Reply | BaseException]] = {}
        self._incoming: dict[int, _Incoming] = {}
        self._outgoing: dict[int, _Outgoing] = {}
        self._broken: BaseException | None = None
        self.request_timeout = request_timeout
        self.send_timeout = max(request_timeout, 1.0)
        """Seconds one frame may take to go out before the connection counts as broken."""
        self.pong: P.Pong | None = None

    # ------------------------------------------------------------ plumbing

    @property
    def connected(self) -> bool:
        return self._broken is None

    async def _read_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        decoder = P.FrameDecoder()
        task_status.started()
        try:
            while True:
                data = await self._stream.receive_some(256 * 1024)
                if not data:
                    raise AgentConnectionLost("the agent closed the connection")
                for body in decoder.feed(data):
                    self._dispatch(P.decode_agent_message(body))
        except P.ProtocolError as exc:
            self._fail(AgentProtocolError(str(exc)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(AgentConnectionLost(f"connection to the agent lost: {exc!r}"))
        except AgentConnectionLost as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        for channel in self._replies.values():
            channel.send_nowait(exc)
        for incoming in self._incoming.values():
            incoming.fail(exc)
        for outgoing in self._outgoing.values():
            outgoing.fail(exc)

    def _dispatch(self, msg: P.AgentMessage) -> None:
        if isinstance(msg, (P.Chunk, P.StreamEnd)):
            incoming = self._incoming.get(msg.stream)
            if incoming is not None:  # else: a stream we gave up on
                incoming.push(msg)
        elif isinstance(msg, P.Credit):
            outgoing = self._outgoing.get(msg.stream)
            if outgoing is not None:
                outgoing.grant(msg.credits)
        elif isinstance(msg, P.Cancel):
            outgoing = self._outgoing.get(msg.stream)
            if outgoing is not None:
                outgoing.fail(AgentProtocolError("the agent cancelled the upload"))
        else:
            if isinstance(msg, P.ErrorReply):
                error = request_error(msg.code, msg.message)
                if msg.id in self._outgoing:
                    self._outgoing[msg.id].fail(error)
                if msg.id in self._incoming:
                    self._incoming[msg.id].fail(error)
            channel = self._replies.get(msg.id)
            if channel is not None:  # else: a late reply to a call that timed out
                channel.send_nowait(msg)

    async def _send(self, msg: P.Message) -> None:
        """Write one whole frame.

        A frame is never interrupted halfway: a cancellation of the caller
        (say, an upload whose HTTP client went away) waits for the frame in
        flight, then arrives at the caller's next checkpoint. Only a frame the
        agent does not take within ``send_timeout`` is abandoned, and then the
        connection is marked broken (its framing is lost; the owner reopens it).
        """
        if self._broken is not None:
            raise AgentConnectionLost(f"connection to the agent is down: {self._broken}")
        frame = P.encode_frame(msg)
        async with self._send_lock:
            if self._broken is not None:
                raise AgentConnectionLost(f"connection to the agent is down: {self._broken}")
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.send_timeout
                try:
                    await self._stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    lost = AgentConnectionLost(f"connection to the agent lost: {exc!r}")
                    self._fail(lost)
                    raise lost from exc
            if scope.cancelled_caught:
                lost = AgentConnectionLost(
                    f"the agent took no frame within {self.send_timeout:g} s; connection abandoned"
                )
                self._fail(lost)
                raise lost
        await trio.lowlevel.checkpoint_if_cancelled()

    def _open_replies(self, request_id: int) -> trio.MemoryReceiveChannel[P.Reply | BaseException]:
        send, receive = trio.open_memory_channel[P.Reply | BaseException](math.inf)
        self._replies[request_id] = send
        return receive

    async def _reply(
        self,
        receive: trio.MemoryReceiveChannel[P.Reply | BaseException],
        expect: type[_R],
        timeout: float,  # noqa: ASYNC109 - the agent's own deadline
        what: str,
    ) -> _R:
        with trio.move_on_after(timeout) as scope:
            reply = await receive.receive()
        if scope.cancelled_caught:
            raise AgentTimeout(f"{what}: no answer from the agent within {timeout:g} s")
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, P.ErrorReply):
            raise request_error(reply.code, reply.message)
        if not isinstance(reply, expect):
            raise AgentProtocolError(f"{what}: expected {expect.__name__}, got {type(reply).__name__}")
        return reply

    async def _call(self, request: P.Message, expect: type[_R], timeout: float | None = None) -> _R:  # noqa: ASYNC109 - the agent's own deadline
        request_id: int = request.id  # type: ignore[attr-defined]
        receive = self._open_replies(request_id)
        try:
            await self._send(request)
            return await self._reply(receive, expect, timeout or self.request_timeout, type(request).__name__)
        finally:
            self._replies.pop(request_id, None)

    def _new_id(self) -> int:
        return next(self._ids)

    # ------------------------------------------------------------ basics

    async def ping(self, *, timeout: float | None = None) -> P.Pong:  # noqa: ASYNC109 - the agent's own deadline
        """Agent version, protocol, boot id, uptimes."""
        return await self._call(P.Ping(id=self._new_id()), P.Pong, timeout)

    async def set_identity(
        self,
        *,
        hostname: str | None = None,
        machine_id: str | None = None,
        env: dict[str, str] | None = None,
        rng_seed: bytes | None = None,
        clock_unix_ns: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the agent's own deadline
    ) -> list[P.StepResult]:
        """Push fresh identity; returns one result per step given ("ok", "skipped", "error")."""
        reply = await self._call(
            P.SetIdentity(
                id=self._new_id(),
                hostname=hostname,
                machine_id=machine_id,
                env=env,
                rng_seed=rng_seed,
                clock_unix_ns=clock_unix_ns,
            ),
            P.IdentitySet,
            timeout,
        )
        return reply.steps

    # ------------------------------------------------------------ the agent endpoint relay

    async def take_relay(self, *, wait_s: float = 20.0, port: int = 7070) -> P.RelayedRequest | None:
        """The next request of code in the guest to its agent endpoint (started on first call),
        or None when none came within ``wait_s``."""
        reply = await self._call(P.TakeRelay(id=self._new_id(), wait_s=wait_s, port=port), P.RelayTaken,
                                 wait_s + self.request_timeout)
        return reply.request

    async def answer_relay(self, no: int, status: int, body: bytes, *,
                           content_type: str = "application/json") -> None:
        """Give request ``no`` of the agent endpoint its answer."""
        await self._call(P.AnswerRelay(id=self._new_id(), no=no, status=status, body=body,
                                       content_type=content_type), P.Done)

    # ------------------------------------------------------------ processes

    async def exec(
        self,
        cmd: str | Sequence[str],
        *,
        args: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - the agent's own deadline
    ) -> P.ExecResult:
        """Run a command to completion.

        ``cmd`` is a shell string (run by ``/bin/sh -c``) unless ``args`` is given
        or ``cmd`` is a sequence (argv).  After ``timeout`` seconds the process
        group is killed and the result has ``timed_out=True`` and exit code 137.
        """
        command, arguments = _split_cmd(cmd, args)
        return await self._call(
            P.Exec(
                id=self._new_id(),
                cmd=command,
                args=arguments,
                env=env,
                cwd=cwd,
                user=user,
                stdin=stdin,
                timeout_sec=timeout,
            ),
            P.ExecResult,
            timeout + EXEC_GRACE,
        )

    async def start_process(
        self,
        cmd: str | Sequence[str],
        *,
        args: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the agent's own deadline
    ) -> P.ProcessStarted:
        """Start a background process (tag generated when omitted); returns pid and tag."""
        command, arguments = _split_cmd(cmd, args)
        return await self._call(
            P.StartProcess(
                id=self._new_id(), cmd=command, args=arguments, env=env, cwd=cwd, user=user, tag=tag
            ),
            P.ProcessStarted,
            timeout,
        )

    async def list_processes(
        self,
        *,
        include_system: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - the agent's own deadline
    ) -> list[P.ProcessInfo]:
        """Processes and PTYs the agent started (running and recently exited); with
        ``include_system`` also every other process of the guest."""
        reply = await self._call(
            P.ListProcesses(id=self._new_id(), include_system=include_system), P.ProcessList, timeout
        )
        return reply.processes

    async def kill(
        self,
        selector: int | str,
        signal: Literal["SIGKILL", "SIGTERM"] = "SIGKILL",
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the agent's own deadline
    ) -> P.Killed:
        """Signal a process (its whole process group) by pid or tag."""
        return await self._call(
            P.KillProcess(id=self._new_id(), selector=str(selector), signal=signal), P.Killed, timeout
        )

    def stream_process(
        self,
        selector: int | str,
        *,
        since: int | None = None,
        window: int = P.DEFAULT_WINDOW,
        timeout: float | None = None,
    ) -> ProcessStream:
        """``async with agent.stream_process(tag) as events: async for event in events``.

        Replays what the agent's ring still holds (from ``since`` if given), then
        live output; ends with :class:`Exited` when the process exits.
        """
        request = P.StreamProcess(id=self._new_id(), selector=str(selector), since=since, window=window)
        return ProcessStream(self, request, window, timeout or self.request_timeout)

    def open_pty(
        self,
        cmd: str = "/bin/bash",
        *,
        args: Sequence[str] | None = None,
        cols: int = 80,
        rows: int = 24,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        window: int = P.DEFAULT_WINDOW,
        timeout: float | None = None,
    ) -> PtySession:
        """``async with agent.open_pty(...) as pty``: start a PTY (argv ``[cmd, *args]``).

        Leaving the block detaches; the PTY keeps running (reattach with
        :meth:`attach_pty` and its ``tag``; kill it with ``pty.kill()``).
        """
        request = P.OpenPty(
            id=self._new_id(),
            cmd=cmd,
            args=list(args) if args is not None else None,
            cols=cols,
            rows=rows,
            env=env,
            cwd=cwd,
            user=user,
            tag=tag,
            window=window,
        )
        return PtySession(self, request, window, timeout or self.request_timeout)

    def attach_pty(
        self,
        tag: str,
        *,
        since: int | None = None,
        window: int = P.DEFAULT_WINDOW,
        timeout: float | None = None,
    ) -> PtySession:
        """Reconnect to a PTY by tag; replays the output since ``since`` (default: all the ring holds)."""
        request = P.AttachPty(id=self._new_id(), tag=tag, since=since, window=window)
        return PtySession(self, request, window, timeout or self.request_timeout)

    async def pty_input(self, tag: str, data: bytes, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the agent's own deadline
        for start in range(0, max(len(data), 1), P.MAX_CHUNK):
            await self._call(
                P.PtyInput(id=self._new_id(), tag=tag, data=data[start : start + P.MAX_CHUNK]),
                P.Done,
                timeout,
            )

    async def pty_resize(self, tag: str, cols: int, rows: int, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the agent's own deadline
        await self._call(P.PtyResize(id=self._new_id(), tag=tag, cols=cols, rows=rows), P.Done, timeout)

    # ------------------------------------------------------------ files

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int | None = None,
        parents: bool = True,
        chunk_size: int = P.CHUNK_SIZE,
        window: int = P.DEFAULT_WINDOW,
        timeout: float | None = None,  # noqa: ASYNC109 - the agent's own deadline
    ) -> P.FileEntry:
        """Write a file atomically (temp file + rename): bytes, or an async iterable of chunks.

        Small byte strings go in one frame; anything else streams with the
        agent's credits, so at most ``window`` chunks are in flight.
        ``timeout`` bounds each wait (reply, credit), not the whole transfer.
        """
        timeout = timeout or self.request_timeout
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) <= chunk_size:
            reply = await self._call(
                P.WriteFile(id=self._new_id(), path=path, data=bytes(data), mode=mode, parents=parents),
                P.FileWritten,
                timeout,
            )
            return reply.entry
        chunk_size = max(1, min(chunk_size, P.MAX_CHUNK))
        request = P.WriteFileStream(id=self._new_id(), path=path, mode=mode, parents=parents, window=window)
        stream_id = request.id
        outgoing = _Outgoing(stream_id)
        self._outgoing[stream_id] = outgoing
        receive = self._open_replies(stream_id)
        finished = False
        try:
            await self._send(request)
            ready = await self._reply(receive, P.StreamReady, timeout, "WriteFileStream")
            outgoing.grant(ready.credits)
            async for piece in _rechunk(data, chunk_size):
                while not outgoing.window.can_send():
                    if outgoing.error is not None:
                        break
                    changed = outgoing.changed
                    with trio.move_on_after(timeout) as scope:
                        await changed.wait()
                    if scope.cancelled_caught:
                        raise AgentTimeout(
                            f"write_file {path}: no credit from the agent within {timeout:g} s"
                        )
                if outgoing.error is not None:
                    break
                seq = outgoing.window.take()
                await self._send(P.Chunk(stream=stream_id, seq=seq, data=piece))
            if outgoing.error is None:
                await self._send(P.StreamEnd(stream=stream_id, seq=outgoing.window.next_seq))
            finished = True
            reply = await self._reply(receive, P.FileWritten, timeout, "WriteFileStream")
            return reply.entry
        finally:
            self._replies.pop(stream_id, None)
            self._outgoing.pop(stream_id, None)
            if not finished and self._broken is None:
                # Every frame we sent went out whole (see _send), so the agent
                # can read this one and drop the partial file.
                with trio.move_on_after(1) as cleanup:
                    cleanup.shield = True
                    try:
                        await self._send(P.Cancel(stream=stream_id))
                    except AgentConnectionLost:
                        pass

    def read_file(
        self,
        path: str,
        *,
        chunk_size: int = P.CHUNK_SIZE,
        window: int = P.DEFAULT_WINDOW,
        timeout: float | None = None,
    ) -> FileReader:
        """``async with agent.read_file(path) as chunks: async for chunk in chunks`` (bytes).

        At most ``window`` chunks of ``chunk_size`` bytes are buffered; ``timeout``
        bounds the wait for each chunk.
        """
        request = P.ReadFileStream(id=self._new_id(), path=path, chunk_size=chunk_size, window=window)
        return FileReader(self, request, window, timeout or self.request_timeout)

    def open_tcp(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        window: int = P.DEFAULT_WINDOW,
        timeout: float | None = None,
    ) -> TcpStream:
        """``async with agent.open_tcp(9222) as conn``: a TCP connection the agent makes to
        ``port`` on the guest's loopback, its bytes relayed over this connection both ways
        (``send_all``, ``receive_some``, ``send_eof``) with credits each way: at most
        ``window`` chunks are buffered per direction. Leaving the block closes it.

        Raises (on entry):
            AgentRequestError: ``connection_refused`` when nothing listens there;
                ``permission_denied`` for a host that is not a loopback address.
        """
        request = P.OpenTcp(id=self._new_id(), port=port, host=host, window=window)
        return TcpStream(self, request, window, timeout or self.request_timeout)

    async def read_file_bytes(self, path: str, *, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 - the agent's own deadline
        """A whole small file in one frame (TooLarge above protocol.MAX_INLINE_FILE)."""
        reply = await self._call(P.ReadFile(id=self._new_id(), path=path), P.FileData, timeout)
        return reply.data

    async def list_dir(
        self,
        path: str,
        depth: int = 1,
        *,
        max_entries: int = 10_000,
        timeout: float | None = None,  # noqa: ASYNC109 - the agent's own deadline
    ) -> P.DirListing:
        """Entries under ``path`` (depth 0/1: children; n: n levels); ``truncated`` past max_entries."""
        return await self._call(
            P.ListDir(id=self._new_id(), path=path, depth=depth, max_entries=max_entries),
            P.DirListing,
            timeout,
        )

    async def mkdir(
        self,
        path: str,
        *,
        parents: bool = True,
        mode: int = 0o755,
        timeout: float | None = None,  # noqa: ASYNC109 - the agent's own deadline
    ) -> P.FileEntry:
        """Create a directory; AlreadyExists (code ``already_exists``) when something is there."""
        reply = await self._call(
            P.MakeDir(id=self._new_id(), path=path, parents=parents, mode=mode), P.DirMade, timeout
        )
        return reply.entry

    async def remove(self, path: str, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the agent's own deadline
        """Remove a file, a symlink or a directory tree."""
        await self._call(P.Remove(id=self._new_id(), path=path), P.Done, timeout)

    async def stat(self, path: str, *, timeout: float | None = None) -> P.FileEntry:  # noqa: ASYNC109 - the agent's own deadline
        reply = await self._call(P.Stat(id=self._new_id(), path=path), P.StatResult, timeout)
        return reply.entry


# ---------------------------------------------------------------- streams


class _IncomingStream:
    """Shared machinery of the agent → host streams (async context manager)."""

    def __init__(self, client: AgentClient, request: Any, window: int, timeout: float) -> None:
        self._client = client
        self._request = request
        self._id: int = request.id
        self._incoming = _Incoming(self._id, window)
        self._timeout = timeout
        self._ended = False
        self.started: P.StreamStarted | None = None

    async def _open(self) -> None:
        client = self._client
        client._incoming[self._id] = self._incoming
        receive = client._open_replies(self._id)
        try:
            await client._send(self._request)
            self.started = await client._reply(
                receive, P.StreamStarted, self._timeout, type(self._request).__name__
            )
        except BaseException:
            client._incoming.pop(self._id, None)
            raise
        finally:
            client._replies.pop(self._id, None)

    async def _close(self) -> None:
        client = self._client
        client._incoming.pop(self._id, None)
        if not self._ended and client.connected:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                try:
                    await client._send(P.Cancel(stream=self._id))
                except AgentConnectionLost:
                    pass

    async def _next(self, idle_timeout: float | None) -> P.Chunk | P.StreamEnd | None:
        """The next frame (None once ended), granting a credit back for each chunk."""
        if self._ended:
            return None
        incoming = self._incoming
        with trio.move_on_after(math.inf if idle_timeout is None else idle_timeout) as scope:
            try:
                msg = await incoming.receive.receive()
            except trio.EndOfChannel:
                self._ended = True
                assert incoming.error is not None
                raise incoming.error from None
        if scope.cancelled_caught:
            raise AgentTimeout(f"stream {self._id}: nothing from the agent within {idle_timeout:g} s")
        if isinstance(msg, P.StreamEnd):
            self._ended = True
            if msg.error is not None:
                raise request_error(msg.error.code, msg.error.message)
            return msg
        incoming.buffered_bytes -= len(msg.data)
        await self._client._send(P.Credit(stream=self._id, credits=incoming.window.consumed(1)))
        return msg

    def statistics(self) -> dict[str, int]:
        """``buffered_bytes`` now and ``max_buffered_bytes`` ever held by this stream."""
        return {
            "buffered_bytes": self._incoming.buffered_bytes,
            "max_buffered_bytes": self._incoming.max_buffered_bytes,
            "window": self._incoming.window.window,
        }


class _OutputStream(_IncomingStream):
    """Process or PTY output: an async iterator of :class:`Output` then :class:`Exited`."""

    idle_timeout: float | None = None

    @property
    def pid(self) -> int | None:
        return self.started.pid if self.started else None

    @property
    def tag(self) -> str:
        assert self.started is not None and self.started.tag is not None
        return self.started.tag

    offset = 0
    """Offset just past the last output received (pass as ``since`` to resume)."""

    async def __aenter__(self) -> Self:
        await self._open()
        assert self.started is not None
        self.offset = self.started.offset
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    def __aiter__(self) -> AsyncIterator[Output | Exited]:
        return self

    async def __anext__(self) -> Output | Exited:
        msg = await self._next(self.idle_timeout)
        if msg is None:
            raise StopAsyncIteration
        if isinstance(msg, P.StreamEnd):
            return Exited(msg.exit_code)
        self.offset = msg.offset + len(msg.data)
        return Output(data=msg.data, channel=msg.channel, offset=msg.offset, skipped=msg.skipped)


class ProcessStream(_OutputStream):
    """Output of a background process; see :meth:`AgentClient.stream_process`."""


class PtySession(_OutputStream):
    """An attached PTY; see :meth:`AgentClient.open_pty` / :meth:`AgentClient.attach_pty`."""

    async def send_input(self, data: bytes) -> None:
        await self._client.pty_input(self.tag, data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._client.pty_resize(self.tag, cols, rows)

    async def kill(self, signal: Literal["SIGKILL", "SIGTERM"] = "SIGKILL") -> P.Killed:
        return await self._client.kill(self.tag, signal)


class FileReader(_IncomingStream):
    """Chunks of a file; see :meth:`AgentClient.read_file`."""

    @property
    def size(self) -> int | None:
        """File size when the read started."""
        return self.started.size if self.started else None

    async def __aenter__(self) -> FileReader:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        msg = await self._next(self._timeout)
        if msg is None or isinstance(msg, P.StreamEnd):
            raise StopAsyncIteration
        return msg.data


class TcpStream(_IncomingStream):
    """A TCP connection inside the guest, relayed by the agent; see :meth:`AgentClient.open_tcp`."""

    def __init__(self, client: AgentClient, request: P.OpenTcp, window: int, timeout: float) -> None:
        super().__init__(client, request, window, timeout)
        self._outgoing = _Outgoing(self._id)
        self._eof_sent = False
        self._send_lock = trio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def __aenter__(self) -> TcpStream:
        client = self._client
        client._outgoing[self._id] = self._outgoing
        client._incoming[self._id] = self._incoming
        receive = client._open_replies(self._id)
        try:
            await client._send(self._request)
            ready = await client._reply(receive, P.StreamReady, self._timeout, "OpenTcp")
        except BaseException:
            client._incoming.pop(self._id, None)
            client._outgoing.pop(self._id, None)
            raise
        finally:
            client._replies.pop(self._id, None)
        self._outgoing.grant(max(1, min(ready.credits, P.MAX_WINDOW)))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._client._outgoing.pop(self._id, None)
        if self._ended and self._eof_sent:
            self._client._incoming.pop(self._id, None)
            return
        await self._close()

    async def receive_some(self) -> bytes:
        """The next bytes from the guest's side; ``b""`` once it closed its end."""
        msg = await self._next(None)
        if msg is None or isinstance(msg, P.StreamEnd):
            return b""
        self.bytes_received += len(msg.data)
        return msg.data

    async def send_all(self, data: bytes) -> None:
        """Send ``data`` to the guest's side, waiting for the agent's credits (backpressure).

        Raises:
            AgentTimeout: no credit for ``max(timeout, 60)`` seconds (the guest's side stopped
                reading).
        """
        outgoing = self._outgoing
        idle = max(self._timeout, 60.0)
        async with self._send_lock:
            if self._eof_sent:
                raise trio.ClosedResourceError("send_all after send_eof")
            view = memoryview(data)
            for start in range(0, max(len(view), 1), P.CHUNK_SIZE):
                while not outgoing.window.can_send():
                    if outgoing.error is not None:
                        raise outgoing.error
                    changed = outgoing.changed
                    with trio.move_on_after(idle) as scope:
                        await changed.wait()
                    if scope.cancelled_caught:
                        raise AgentTimeout(f"tcp stream {self._id}: no credit within {idle:g} s")
                if outgoing.error is not None:
                    raise outgoing.error
                piece = bytes(view[start : start + P.CHUNK_SIZE])
                await self._client._send(P.Chunk(stream=self._id, seq=outgoing.window.take(), data=piece))
                self.bytes_sent += len(piece)

    async def send_eof(self) -> None:
        """Half close: the guest's side reads EOF; bytes still come back."""
        async with self._send_lock:
            if not self._eof_sent:
                self._eof_sent = True
                await self._client._send(P.StreamEnd(stream=self._id, seq=self._outgoing.window.next_seq))


# ---------------------------------------------------------------- helpers


def _split_cmd(cmd: str | Sequence[str], args: Sequence[str] | None) -> tuple[str, list[str] | None]:
    if isinstance(cmd, str):
        return cmd, list(args) if args is not None else None
    argv = list(cmd)
    if not argv:
        raise ValueError("empty argv")
    return argv[0], argv[1:] + list(args or [])


async def _rechunk(
    data: bytes | bytearray | memoryview | AsyncIterable[bytes], size: int
) -> AsyncIterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])
        return
    async for piece in data:
        for start in range(0, len(piece), size):
            yield bytes(piece[start : start + size])


@asynccontextmanager
async def open_agent(
    unix_socket_path: str,
    *,
    connect_timeout: float = 10.0,
    request_timeout: float = 30.0,
) -> AsyncIterator[AgentClient]:
    """Connect to a guest agent's unix socket and handshake with a ping.

    Retries connecting and pinging until ``connect_timeout`` (the socket may not
    exist yet, or the agent may not be up behind libvirt's socket yet), then
    raises :class:`AgentConnectError`.  On exit the reader task is cancelled
    and the socket closed; processes and PTYs keep running in the guest.
    """
    deadline = trio.current_time() + connect_timeout
    while True:
        stream = await _connect(unix_socket_path, deadline, connect_timeout)
        try:
            async with stream, trio.open_nursery() as nursery:
                client = AgentClient(stream, request_timeout=request_timeout)
                await nursery.start(client._read_loop)
                await _handshake(client, unix_socket_path, deadline)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
            return
        except BaseExceptionGroup as group:
            # The nursery only holds our reader task, which never raises: surface the
            # caller's own exception rather than a group around it.
            exc = _single(group)
            if not isinstance(exc, _Reconnect):
                raise exc from None
        except _Reconnect:
            pass
        # QEMU accepts on the socket before the guest opened its port, then resets
        # the connection: try again while the deadline allows.
        await trio.sleep(0.2)


class _Reconnect(Exception):
    """The connection dropped during the handshake; connect again."""


async def _connect(path: str, deadline: float, connect_timeout: float) -> trio.SocketStream:
    last: BaseException | None = None
    while True:
        try:
            with trio.fail_at(deadline):
                return await trio.open_unix_socket(path)
        except trio.TooSlowError:
            raise AgentConnectError(
                f"{path}: no connection within {connect_timeout:g} s: {last}") from None
        except OSError as exc:
            last = exc
            if trio.current_time() >= deadline:
                raise AgentConnectError(f"{path}: {exc}") from exc
            await trio.sleep(0.05)


HANDSHAKE_FIRST_PING_S = 0.05
"""The first re-ping of a handshake; the interval doubles up to :data:`HANDSHAKE_MAX_PING_S`."""
HANDSHAKE_MAX_PING_S = 1.0


async def _handshake(client: AgentClient, path: str, deadline: float) -> None:
    """Ping until the agent answers, re-pinging at a growing interval (50 ms doubling to 1 s).

    A ping written before the guest agent (re)opened its port is lost (a VM just
    restored or resumed: the agent reopens its port within 200 ms), so waiting out
    one ping at a time cost a whole second per lost ping. Earlier pings stay
    pending: the first answer to any of them completes the handshake.
    """
    pongs: list[P.Pong] = []
    lost: list[AgentConnectionLost] = []

    async def ping(scope: trio.CancelScope) -> None:
        try:
            pongs.append(await client.ping(timeout=max(0.01, deadline - trio.current_time())))
        except AgentTimeout:
            return
        except AgentConnectionLost as exc:
            lost.append(exc)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        interval = HANDSHAKE_FIRST_PING_S
        while trio.current_time() < deadline:
            nursery.start_soon(ping, nursery.cancel_scope)
            await trio.sleep(min(interval, max(0.0, deadline - trio.current_time())))
            interval = min(interval * 2, HANDSHAKE_MAX_PING_S)
        await trio.sleep_until(deadline + 0.02)  # the last pings' own timeouts
        nursery.cancel_scope.cancel()
    if pongs:
        client.pong = pongs[0]
    elif lost:
        if trio.current_time() >= deadline:
            raise AgentConnectError(f"{path}: {lost[0]}") from lost[0]
        raise _Reconnect() from lost[0]
    else:
        raise AgentConnectError(f"{path}: the agent did not answer a ping")
    if client.pong.protocol != P.PROTOCOL_VERSION:
        raise AgentConnectError(
            f"agent speaks protocol {client.pong.protocol}, this client {P.PROTOCOL_VERSION}")


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
