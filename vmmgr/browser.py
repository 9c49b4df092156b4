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

:func:`warm_up` is what a warm pool's *browser spare* runs once after its restore
(:mod:`dovecote.vmmgr.pool`): under TCG a restored guest starts with QEMU's
translation cache empty, so the first round trips of a session (the agent's TCP
relay, Chromium's DevTools server, attaching to the page and enabling its domains)
ran several times slower than later ones. The warm-up takes those paths once, the way a
session does (``/json/version`` over the agent's TCP relay, then the browser's
DevTools WebSocket: attach to the page, enable its domains, evaluate, detach), and
leaves nothing behind (the viewport override it sets is cleared; a detached session's
domains are gone).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage

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


WARM_UP_PAGE_CALLS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("Page.enable", {}), ("Runtime.enable", {}), ("Network.enable", {}), ("Log.enable", {}),
    ("Runtime.runIfWaitingForDebugger", {}),
    ("Runtime.evaluate", {"expression": "document.readyState", "returnByValue": True}),
    ("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800, "deviceScaleFactor": 1,
                                            "mobile": False}),
    ("Emulation.clearDeviceMetricsOverride", {}),
)
"""What :func:`warm_up` asks on the page (a session's monitor asks the same when it attaches)."""


async def warm_up(client: Any, port: int = 9222) -> None:
    """One session's worth of DevTools round trips through the agent (see the module)."""
    async with client.open_tcp(port, window=TCP_WINDOW) as conn:
        await conn.send_all(f"GET /json/version HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                            "Connection: close\r\n\r\n".encode())
        data = b""
        while b"webSocketDebuggerUrl" not in data or not data.rstrip().endswith(b"}"):
            chunk = await conn.receive_some()
            if not chunk:
                break
            data += chunk
    url = str(json.loads(data.partition(b"\r\n\r\n")[2] or b"{}").get("webSocketDebuggerUrl", ""))
    if "/devtools/browser/" not in url:
        raise OSError(f"no browser DevTools endpoint in /json/version: {data[:200]!r}")
    path = "/devtools/browser/" + url.rsplit("/devtools/browser/", 1)[1]
    async with client.open_tcp(port, window=TCP_WINDOW) as conn:
        cdp = _WarmUpCdp(conn)
        await cdp.open(port, path)
        await cdp.call("Browser.getVersion")
        await cdp.call("Target.setDiscoverTargets", {"discover": True})
        targets = (await cdp.call("Target.getTargets")).get("targetInfos") or []
        page = next((t["targetId"] for t in targets if t.get("type") == "page"), None)
        if page is None:
            raise OSError("the browser has no page")
        await cdp.call("Browser.getWindowForTarget", {"targetId": page})
        session = (await cdp.call("Target.attachToTarget", {"targetId": page, "flatten": True}))["sessionId"]
        for method, params in WARM_UP_PAGE_CALLS:
            await cdp.call(method, params, session)
        await cdp.call("Target.detachFromTarget", {"sessionId": session})
        await cdp.call("Target.setDiscoverTargets", {"discover": False})


class _WarmUpCdp:
    """A minimal CDP client over an agent TCP connection (wsproto, one call at a time)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.next_id = 0
        self.text: list[str] = []
        self.accepted = False

    async def open(self, port: int, path: str) -> None:
        await self.conn.send_all(self.ws.send(Request(host=f"127.0.0.1:{port}", target=path)))
        while not self.accepted:
            await self._messages()

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self.conn.send_all(self.ws.send(TextMessage(data=json.dumps(message))))
        while True:
            for text in await self._messages():
                reply = json.loads(text)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise OSError(f"{method}: {reply['error']}")
                    result: dict[str, Any] = reply.get("result") or {}
                    return result

    async def _messages(self) -> list[str]:
        data = await self.conn.receive_some()
        if not data:
            raise OSError("the browser closed its DevTools connection")
        self.ws.receive_data(data)
        done: list[str] = []
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.accepted = True
            elif isinstance(event, (RejectConnection, CloseConnection)):
                raise OSError("the browser refused or closed its DevTools WebSocket")
            elif isinstance(event, TextMessage):
                self.text.append(event.data)
                if event.message_finished:
                    done.append("".join(self.text))
                    self.text.clear()
        return done


__all__ = ["BrowserTemplates", "TcpStreams", "warm_up"]
