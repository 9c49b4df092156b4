"""Two-way TCP streams (``OpenTcp``): a connection to a port on the guest's own loopback.

Capsules cannot reach the host and the host never reaches into the guest's
network, so a service in the guest that the host must talk to (the browser
template's Chromium DevTools endpoint on ``127.0.0.1:9222``) is reached this
way: the agent opens the TCP connection and relays its bytes over its channel
as one stream in both directions (the protocol's "Streams", both ways):

* socket → host: :class:`~.channel.OutStream` with the host's credits; the
  socket is read only when a credit is there, so a slow host slows the
  connection instead of growing a buffer; the socket's EOF is a ``StreamEnd``;
* host → socket: ``Chunk`` frames within the credits granted here (the
  window of the ``StreamReady`` reply, one ``Credit`` back per chunk once it is
  written and drained); the host's ``StreamEnd`` half-closes the socket.

Only loopback addresses are accepted: the relay is no way out of the guest.
The stream ends once both directions ended; a host ``Cancel`` or a failed
write closes the connection at once (a failed write tells the host with a
``Cancel``, so its sender stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress

from .. import protocol as P
from .channel import Session
from .errors import AgentError

CONNECT_TIMEOUT = 10.0
READ_SIZE = P.CHUNK_SIZE
WINDOW = 16
"""Host chunks in flight towards the socket (the ``StreamReady`` credits)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def relay(session: Session, req: P.OpenTcp) -> None:
    """Serve one ``OpenTcp`` until both directions ended (or the host cancelled)."""
    if not is_loopback(req.host):
        raise AgentError("permission_denied", f"{req.host} is not a loopback address of the guest")
    if not 1 <= req.port <= 65535:
        raise AgentError("invalid_argument", f"port {req.port} outside 1..65535")
    if req.id in session.uploads or req.id in session.streams:
        raise AgentError("invalid_argument", f"stream {req.id} is already open")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(req.host, req.port), timeout=CONNECT_TIMEOUT)
    except ConnectionRefusedError:
        raise AgentError("connection_refused", f"nothing listens on {req.host}:{req.port}") from None
    except TimeoutError:
        raise AgentError("io_error", f"{req.host}:{req.port}: no connection within "
                                     f"{CONNECT_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise AgentError("io_error", f"{req.host}:{req.port}: {exc}") from None
    out = session.open_stream(req.id, req.window)
    window = P.ReceiveWindow(WINDOW)
    queue: asyncio.Queue[P.Chunk | P.StreamEnd | None] = asyncio.Queue()
    session.uploads[req.id] = queue
    state = {"up_ended": False}

    async def socket_to_host() -> None:
        while True:
            await out.wait_credit()  # read only what the host can take: backpressure
            try:
                data = await reader.read(READ_SIZE)
            except OSError as exc:
                state["up_ended"] = True
                await out.end(error=P.ErrorInfo(code="io_error", message=str(exc)))
                return
            if not data:
                state["up_ended"] = True
                await out.end()
                return
            await out.chunk(data)

    up: asyncio.Future[None] | None = None
    try:
        await session.send(P.StreamReady(id=req.id, stream=req.id, credits=window.window))
        up = asyncio.ensure_future(socket_to_host())
        while True:
            msg = await queue.get()
            if msg is None:  # the host's Cancel
                return
            if isinstance(msg, P.StreamEnd):
                window.end(msg.seq)
                if msg.error is not None:
                    return
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                break
            window.receive(msg.seq)
            try:
                writer.write(msg.data)
                await writer.drain()
            except OSError as exc:
                if not state["up_ended"]:
                    state["up_ended"] = True
                    up.cancel()
                    await out.end(error=P.ErrorInfo(code="io_error", message=str(exc)))
                await session.send(P.Cancel(stream=req.id))
                return
            await session.send(P.Credit(stream=req.id, credits=window.consumed(1)))
        await up  # the host is done sending: wait for the socket's side to finish
    finally:
        if up is not None:
            up.cancel()
            with contextlib.suppress(BaseException):
                await up
        writer.close()
        session.uploads.pop(req.id, None)
        session.close_stream(req.id)
