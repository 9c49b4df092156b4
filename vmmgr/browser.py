"""Browser capsules: the browser template of this host, and TCP streams into a guest's loopback.

The browsers service (``services/browsers/vm.py``) runs a browser session as a
capsule of template ``browser``: the desktop image (it has Chromium) booted
once per host, headless Chromium started with its DevTools endpoint on the
guest's loopback (``127.0.0.1:9222``, :func:`dovecote.vmmgr.templates.ensure_browser`),
then frozen. A session is a restore: Chromium is already up.

:class:`BrowserTemplates` answers
:class:`~dovecote.bus.messages.capsules.EnsureBrowserTemplate` exactly as the
desktop template answers its own message (the same machinery,
:class:`~dovecote.vmmgr.desktop.DesktopTemplates`, with another kind).

:class:`TcpStreams` serves :class:`~dovecote.bus.messages.capsule_streams.StreamTcp`:
capsules cannot reach the host and the host never reaches into a guest's
network, so the guest agent opens the TCP connection to the port on the
guest's own loopback and relays its bytes over its channel
(:meth:`~dovecote.vmmgr.guest.client.AgentClient.open_tcp`); this handler
pipes those bytes to the bus stream and back. Order holds at every hop (one
ordered stream each), and so does backpressure: the bus stream's credits stop
the pump from the agent, whose credits stop the agent reading the socket, and
the other way round; each hop buffers at most its window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from dovecote.bus.messages import capsule_streams as cs
from dovecote.bus.messages import capsules as m
from dovecote.bus.stream import Stream
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.agent_ops import agent_errors
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.desktop import DesktopTemplates

log = get_logger("dovecote.vmmgr.browser")

TCP_WINDOW = 16
"""Chunks in flight from the agent per TCP stream."""


class BrowserTemplates(DesktopTemplates):
    """This host's browser template (built once, on demand)."""

    kind = "browser"

    def register(self, handle: Any) -> None:
        handle(m.EnsureBrowserTemplate, self.ensure)

    async def ensure(self, msg: Any = None) -> m.DesktopTemplateStatus:
        """As the desktop's; a status-only ask also says when this host runs no VM driver
        (the browsers service then falls back to its host provider, if enabled)."""
        machines = self.capsules.machines
        if self.status == "unavailable" and machines.driver is None and self._done.is_set():
            self._set("unavailable", f"the VM driver is not ready ({machines.status})")
        return await super().ensure(msg)

    async def _make(self, driver: Any, image: Any, image_dir: Any) -> Any:
        from dovecote.vmmgr.templates import ensure_browser

        return await ensure_browser(driver, image, image_dir, boot_timeout_s=self.boot_timeout_s)


class TcpStreams:
    """The TCP stream handler of one vmmgr (on top of its :class:`Capsules`)."""

    def __init__(self, capsules: Capsules) -> None:
        self.capsules = capsules

    def register(self, handle_stream: Callable[[type, Any], None]) -> None:
        handle_stream(cs.StreamTcp, self.stream)

    async def stream(self, msg: cs.StreamTcp, stream: Stream) -> None:
        if not 1 <= msg.port <= 65535:
            raise ServiceError(400, "invalid_request", "port must be between 1 and 65535")
        row, client = await self.capsules.agent_of(msg)
        try:
            async with agent_errors(row["id"]), client.open_tcp(msg.port, window=TCP_WINDOW) as conn:
                await stream.send(cs.TcpStarted())
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guest_to_caller, conn, stream)
                    await self._caller_to_guest(conn, stream)
        except ServiceError as exc:
            if exc.code == "agent_error" and "connection_refused" in exc.message:
                raise ServiceError(502, "connection_refused",
                                   f"nothing listens on port {msg.port} in the capsule") from None
            raise
        log.debug("tcp stream closed", extra={"capsule_id": row["id"], "port": msg.port})

    @staticmethod
    async def _guest_to_caller(conn: Any, stream: Stream) -> None:
        while True:
            data = await conn.receive_some()
            if not data:
                await stream.send_eof()
                return
            await stream.send(data)  # waits for the caller's credit: backpressure

    @staticmethod
    async def _caller_to_guest(conn: Any, stream: Stream) -> None:
        async for frame in stream:
            if not isinstance(frame, bytes):
                raise ServiceError(400, "invalid_request", "a TCP stream carries bytes")
            if frame:
                await conn.send_all(frame)
        await conn.send_eof()


__all__ = ["BrowserTemplates", "TcpStreams"]
