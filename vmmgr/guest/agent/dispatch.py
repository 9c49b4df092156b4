"""Request dispatch: one host request in, one reply (or a stream) out.

:class:`Agent` is the agent's state that outlives a host connection (its
configuration, start time and :class:`~.processes.Processes`) and the session
handler: :meth:`Agent.handle` answers a request and turns failures into an
``ErrorReply`` with the protocol's code; the streaming requests (process and PTY
output, file reads and uploads) run here on top of the session's streams.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time

from .. import protocol as P
from . import identity, tcp
from .agentapi import AgentEndpoint
from .channel import Session
from .errors import AgentError, os_error
from .files import (
    AtomicWriter,
    check_path,
    file_entry,
    list_dir,
    lstat_or_error,
    make_dir,
    open_for_read,
    read_small,
    remove_path,
    write_file,
)
from .processes import Managed, Processes

AGENT_VERSION = "0.1.0"
UPLOAD_IDLE_TIMEOUT = 120.0

log = logging.getLogger("dovecote-agent")


class Agent:
    def __init__(self, config: argparse.Namespace) -> None:
        self.config = config
        self.started = time.monotonic()
        self.processes = Processes(config.default_user)
        self.endpoint = AgentEndpoint()

    async def handle(self, session: Session, req: P.Request) -> None:
        try:
            reply = await self.answer(session, req)
        except AgentError as exc:
            reply = P.ErrorReply(id=req.id, code=exc.code, message=exc.message)
        except P.ProtocolError as exc:
            reply = P.ErrorReply(id=req.id, code="protocol_error", message=str(exc))
        except OSError as exc:
            err = os_error(exc)
            reply = P.ErrorReply(id=req.id, code=err.code, message=err.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s failed", type(req).__name__)
            reply = P.ErrorReply(id=req.id, code="internal", message=f"{type(exc).__name__}: {exc}")
        if reply is not None:
            await session.send(reply)

    async def answer(self, session: Session, req: P.Request) -> P.Reply | None:
        processes = self.processes
        if isinstance(req, P.Ping):
            return self.pong(req)
        if isinstance(req, P.SetIdentity):
            return await asyncio.to_thread(identity.set_identity, req, self.config, processes.identity_env)
        if isinstance(req, P.Exec):
            return await processes.exec(req)
        if isinstance(req, P.StartProcess):
            return await processes.start_process(req)
        if isinstance(req, P.ListProcesses):
            return await asyncio.to_thread(processes.list_processes, req)
        if isinstance(req, P.KillProcess):
            return processes.kill(req)
        if isinstance(req, P.StreamProcess):
            m = processes.find(req.selector)
            if m is None:
                raise AgentError("not_found", f"no process {req.selector!r}")
            await self.follow(session, req.id, m, req.since, req.window)
            return None
        if isinstance(req, P.OpenPty):
            m = await processes.open_pty(req)
            await self.follow(session, req.id, m, 0, req.window)
            return None
        if isinstance(req, P.AttachPty):
            await self.follow(session, req.id, processes.pty(req.tag), req.since, req.window)
            return None
        if isinstance(req, P.PtyInput):
            return await processes.pty_input(req)
        if isinstance(req, P.PtyResize):
            return processes.pty_resize(req)
        if isinstance(req, P.WriteFile):
            path = check_path(req.path)
            if len(req.data) > P.MAX_INLINE_FILE:
                raise AgentError("too_large", f"inline write over {P.MAX_INLINE_FILE} bytes")
            entry = await asyncio.to_thread(write_file, path, req.data, req.mode, req.parents,
                                            processes.default_owner())
            return P.FileWritten(id=req.id, entry=entry)
        if isinstance(req, P.WriteFileStream):
            return await self.receive_file(session, req)
        if isinstance(req, P.ReadFile):
            data = await asyncio.to_thread(read_small, check_path(req.path))
            data.id = req.id
            return data
        if isinstance(req, P.ReadFileStream):
            await self.send_file(session, req)
            return None
        if isinstance(req, P.OpenTcp):
            await tcp.relay(session, req)
            return None
        if isinstance(req, P.TakeRelay):
            return await self.endpoint.take(req)
        if isinstance(req, P.AnswerRelay):
            return self.endpoint.answer(req)
        if isinstance(req, P.ListDir):
            entries, truncated = await asyncio.to_thread(
                list_dir, check_path(req.path), req.depth, max(1, req.max_entries)
            )
            return P.DirListing(id=req.id, entries=entries, truncated=truncated)
        if isinstance(req, P.MakeDir):
            entry = await asyncio.to_thread(make_dir, check_path(req.path), req.parents, req.mode,
                                            processes.default_owner())
            return P.DirMade(id=req.id, entry=entry)
        if isinstance(req, P.Remove):
            await asyncio.to_thread(remove_path, check_path(req.path))
            return P.Done(id=req.id)
        if isinstance(req, P.Stat):
            path = check_path(req.path)
            st = await asyncio.to_thread(lstat_or_error, path)
            return P.StatResult(id=req.id, entry=file_entry(path, st))
        raise AgentError("invalid_argument", f"unknown request {type(req).__name__}")

    def pong(self, req: P.Ping) -> P.Pong:
        total, used = identity.disk_usage("/")
        return P.Pong(
            id=req.id,
            agent_version=AGENT_VERSION,
            protocol=P.PROTOCOL_VERSION,
            boot_id=identity.boot_id(),
            uptime=identity.uptime(),
            agent_uptime=time.monotonic() - self.started,
            agent_pid=os.getpid(),
            disk_total_bytes=total,
            disk_used_bytes=used,
        )

    # ----- streams

    async def follow(
        self, session: Session, stream_id: int, m: Managed, since: int | None, window: int
    ) -> None:
        """StreamStarted, then the ring from ``since`` (default: all it holds), then live output."""
        stream = session.open_stream(stream_id, window)
        try:
            offset = m.ring.start if since is None else max(0, since)
            await session.send(
                P.StreamStarted(id=stream_id, stream=stream_id, pid=m.pid, tag=m.tag, offset=offset)
            )
            while True:
                await stream.wait_credit()
                piece = m.ring.read(offset, P.CHUNK_SIZE)
                if piece is not None:
                    skipped, at, channel, data = piece
                    await stream.chunk(data, channel=channel, offset=at, skipped=skipped)
                    offset = at + len(data)
                elif m.ring.closed:
                    await stream.end(exit_code=m.exit_code)
                    return
                else:
                    await m.ring.wait(offset)
        except asyncio.CancelledError:
            if stream_id in session.streams and not session.channel.stopped.is_set():
                # Cancelled by the host (Cancel): close the stream politely.
                await session.send(P.StreamEnd(stream=stream_id, seq=stream.window.next_seq))
            else:
                raise
        finally:
            session.close_stream(stream_id)

    async def send_file(self, session: Session, req: P.ReadFileStream) -> None:
        path = check_path(req.path)
        fd, st = await asyncio.to_thread(open_for_read, path)
        size = min(max(1, req.chunk_size), P.MAX_CHUNK)
        try:
            stream = session.open_stream(req.id, req.window)
            try:
                await session.send(P.StreamStarted(id=req.id, stream=req.id, size=st.st_size))
                offset = 0
                while True:
                    await stream.wait_credit()
                    try:
                        data = await asyncio.to_thread(os.read, fd, size)
                    except OSError as exc:
                        err = os_error(exc, path)
                        await stream.end(error=P.ErrorInfo(code=err.code, message=err.message))
                        return
                    if not data:
                        await stream.end()
                        return
                    await stream.chunk(data, offset=offset)
                    offset += len(data)
            finally:
                session.close_stream(req.id)
        finally:
            os.close(fd)

    async def receive_file(self, session: Session, req: P.WriteFileStream) -> P.FileWritten:
        path = check_path(req.path)
        if req.id in session.uploads or req.id in session.streams:
            raise AgentError("invalid_argument", f"stream {req.id} is already open")
        writer = await asyncio.to_thread(AtomicWriter, path, req.mode, req.parents,
                                         self.processes.default_owner())
        window = P.ReceiveWindow(max(1, min(req.window, P.MAX_WINDOW)))
        queue: asyncio.Queue[P.Chunk | P.StreamEnd | None] = asyncio.Queue()
        session.uploads[req.id] = queue
        committed = False
        try:
            await session.send(P.StreamReady(id=req.id, stream=req.id, credits=window.window))
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), timeout=UPLOAD_IDLE_TIMEOUT)
                except TimeoutError:
                    raise AgentError("io_error", f"upload idle for {UPLOAD_IDLE_TIMEOUT:.0f} s") from None
                if msg is None:
                    raise AgentError("io_error", "upload cancelled by the host")
                if isinstance(msg, P.StreamEnd):
                    window.end(msg.seq)
                    if msg.error is not None:
                        raise AgentError(msg.error.code, f"host aborted the upload: {msg.error.message}")
                    entry = await asyncio.to_thread(writer.commit)
                    committed = True
                    return P.FileWritten(id=req.id, entry=entry)
                window.receive(msg.seq)
                if len(msg.data) > P.MAX_CHUNK:
                    raise AgentError("too_large", f"chunk over {P.MAX_CHUNK} bytes")
                await asyncio.to_thread(writer.write, msg.data)
                await session.send(P.Credit(stream=req.id, credits=window.consumed(1)))
        finally:
            session.uploads.pop(req.id, None)
            if not committed:
                writer.abort()
