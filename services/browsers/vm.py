"""The VM provider: a browser session is a capsule restored from the browser template.

Everything goes through vmmgr on the bus, so a session is a capsule like any
other (the team's capsule caps, vmmgr's network guard, reconciliation):

* the browser template (``vmmgr/browser.py``: the desktop image booted once
  per host with headless Chromium already running, its DevTools endpoint on
  the guest's loopback, frozen) is asked for with ``EnsureBrowserTemplate``;
* create restores a capsule of template ``browser`` (``CreateCapsule``; a
  restore, not a boot and not a Chromium cold start), waits until it runs;
* the DevTools connection is a WebSocket spoken by this service over a
  ``StreamTcp`` bus stream to ``vmmgr.<host>``: vmmgr asks the guest agent to
  open the TCP connection to ``127.0.0.1:9222`` inside the guest and relays
  its bytes (capsules cannot reach the host; the host never reaches into a
  guest's network). :class:`GuestWebSocket` is that connection: the
  ``send``/``receive``/``aclose`` of :class:`~.browser.LiveBrowser`'s
  connection, one CDP message per WebSocket message (wsproto does the framing,
  without I/O);
* ending the session destroys the capsule (``DestroyCapsule``). When the VM
  dies, the agent's connection drops, the stream fails at once, and the
  session ends ``failed``.
"""

from __future__ import annotations

import collections
import contextlib
import json
from contextlib import AsyncExitStack
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.events import Message as WsMessage

from dovecote.bus.messages import capsule_streams as cs
from dovecote.bus.messages import capsules as c
from dovecote.bus.messages.common import Principal
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.services.browsers.host import MAX_MESSAGE, BrowserGone

log = get_logger("dovecote.browsers.vm")

TEMPLATE = "browser"
CDP_PORT = 9222
"""Chromium's DevTools port in the browser template (guest loopback; ``vmmgr/templates.py``)."""
TEMPLATE_WINDOW = (1280, 800)
"""The window size of the frozen browser (``--window-size`` in ``vmmgr/templates.py``)."""
TEMPLATE_WAIT_S = 3600.0
"""How long a session waits for the browser template to be built (the first time on a host)."""
RUNNING_WAIT_S = 120.0
RUNNING_RECHECK_S = 0.5
"""While a capsule is not running yet, how often its status is asked again anyway (the
``capsule.state.changed`` event wakes the wait at once; this covers a lost event)."""
READY_FRESH_S = 5.0
"""A template status ``ready`` seen this recently is not asked again by the create."""
STREAM_WINDOW = 16
ISOLATION = "vm: a QEMU capsule with its own kernel, behind vmmgr's network guard"


class GuestWebSocket:
    """A DevTools WebSocket to Chromium inside a capsule, over one ``StreamTcp`` bus stream."""

    def __init__(self, stream: Any, stack: AsyncExitStack) -> None:
        self.stream = stream
        self._stack = stack
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._messages: collections.deque[bytes] = collections.deque()
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._accepted = False
        self._send_lock = trio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, bus: Any, host: str, start: cs.StreamTcp, path: str) -> GuestWebSocket:
        """Open the bus stream, then the WebSocket handshake for ``path``."""
        stack = AsyncExitStack()
        try:
            stream = await stack.enter_async_context(
                bus.open_stream(f"vmmgr.{host}", start, timeout=30, window=STREAM_WINDOW))
            first = await stream.receive()
            if not isinstance(first, cs.TcpStarted):
                raise BrowserGone(f"vmmgr answered {type(first).__name__} to a TCP stream")
            conn = cls(stream, stack)
            await conn._write(conn._ws.send(Request(host=f"127.0.0.1:{start.port}", target=path)))
            while not conn._accepted:
                await conn._pump()
            return conn
        except BaseException:
            with trio.CancelScope(shield=True):
                await stack.aclose()
            raise

    async def _write(self, data: bytes) -> None:
        if data:
            await self.stream.send(data)

    async def _pump(self) -> None:
        try:
            data = await self.stream.receive()
        except trio.EndOfChannel:
            raise BrowserGone("the browser closed its DevTools connection") from None
        except Exception as exc:
            raise BrowserGone(f"the DevTools stream failed: {exc}") from exc
        if not isinstance(data, bytes):
            raise BrowserGone(f"unexpected {type(data).__name__} on the DevTools stream")
        self._ws.receive_data(data)
        for event in self._ws.events():
            if isinstance(event, AcceptConnection):
                self._accepted = True
            elif isinstance(event, (RejectConnection, RejectData)):
                raise BrowserGone("Chromium refused the DevTools WebSocket")
            elif isinstance(event, WsMessage):
                payload = event.data.encode() if isinstance(event, TextMessage) else bytes(event.data)
                self._partial.append(payload)
                self._partial_size += len(payload)
                if self._partial_size > MAX_MESSAGE:
                    raise BrowserGone("a CDP message larger than the limit")
                if event.message_finished:
                    self._messages.append(b"".join(self._partial))
                    self._partial.clear()
                    self._partial_size = 0
            elif isinstance(event, Ping):
                async with self._send_lock:
                    await self._write(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise BrowserGone(f"the browser closed the DevTools WebSocket ({event.code})")

    async def receive(self) -> bytes:
        while not self._messages:
            await self._pump()
        return self._messages.popleft()

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            if self._closed:
                raise BrowserGone("the DevTools connection is closed")
            try:
                await self._write(self._ws.send(TextMessage(data=data.decode())))
            except BrowserGone:
                raise
            except Exception as exc:
                raise BrowserGone(f"the DevTools stream failed: {exc}") from exc

    async def aclose(self) -> None:
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self._stack.aclose()


async def http_get(bus: Any, host: str, start: cs.StreamTcp, path: str) -> dict[str, Any]:
    """One HTTP GET to the guest's DevTools port through a TCP stream; its JSON body."""
    async with bus.open_stream(f"vmmgr.{host}", start, timeout=30, window=STREAM_WINDOW) as stream:
        first = await stream.receive()
        if not isinstance(first, cs.TcpStarted):
            raise BrowserGone(f"vmmgr answered {type(first).__name__} to a TCP stream")
        # HTTP/1.1 (Chromium's DevTools server closes HTTP/1.0 requests unanswered), read up
        # to Content-Length; no half close (it drops a connection whose read side ends).
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{start.port}\r\n"
                          "Connection: close\r\n\r\n".encode())
        body = bytearray()
        with contextlib.suppress(trio.EndOfChannel), trio.fail_after(30):
            while len(body) < 1024 * 1024 and not _complete(body):
                chunk = await stream.receive()
                if isinstance(chunk, bytes):
                    body += chunk
    head, _, payload = bytes(body).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise BrowserGone(f"the DevTools endpoint answered {head[:80]!r}")
    result: dict[str, Any] = json.loads(payload)
    return result


def _complete(data: bytearray) -> bool:
    """Whether ``data`` holds a whole HTTP response (headers and ``Content-Length`` bytes)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    for line in bytes(data[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(data) - end - 4 >= int(value.strip())
    return False


class VmProvider:
    """Creates and ends VM browser sessions through vmmgr."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self._changed: dict[str, trio.Event] = {}
        """capsule id -> set by its next status event (:meth:`watch_capsules`)."""
        self._ready_seen = -float("inf")
        self._paths: dict[str, str] = {}
        """host -> the browser's DevTools path last seen there: every restore of a host's
        template is the same Chromium, so its ``/devtools/browser/<id>`` is known without
        asking ``/json/version`` again (asked when the WebSocket is refused: a new template)."""

    async def watch_capsules(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        """Wake the sessions waiting for their capsule on its status events (vmmgr's
        ``capsule.state.changed``), so a session does not poll for ``running``."""
        started = False
        try:
            async with self.bus.subscribe(c.CAPSULE_STATE_TOPIC) as events:
                task_status.started()
                started = True
                async for _, event in events:
                    if isinstance(event, c.CapsuleStateChanged):
                        changed = self._changed.get(event.capsule_id)
                        if changed is not None:
                            changed.set()
        except Exception:  # the waits then recheck every RUNNING_RECHECK_S
            log.warning("no capsule status events", exc_info=True)
            if not started:
                task_status.started()

    async def template(self, actor: Principal, *, build: bool = True) -> c.DesktopTemplateStatus:
        reply: c.DesktopTemplateStatus = await self.bus.request(
            "vmmgr", c.EnsureBrowserTemplate(actor=actor, build=build), timeout=10)
        if reply.status == "ready":
            self._ready_seen = trio.current_time()
        return reply

    async def available(self) -> tuple[bool, str]:
        """Whether a VM driver runs here (the template is ready, being built or buildable)."""
        if self.bus is None:
            return False, "no bus"
        try:
            status = await self.template(Principal(auth_type="system"), build=False)
        except Exception as exc:
            return False, f"vmmgr does not answer: {exc}"
        if status.status == "unavailable" and ("disabled" in status.detail or "failed" in status.detail):
            return False, status.detail  # no VM driver here (a driver still coming up counts)
        if status.status == "failed":
            return False, f"the browser template failed: {status.detail}"
        return True, status.status

    async def create_capsule(self, actor: Principal, session_id: str) -> tuple[str, str] | None:
        """The capsule of a new session (restored now) when the template is ready, else None
        (the session waits for the template in the background: :meth:`wait_template`)."""
        if trio.current_time() - self._ready_seen < READY_FRESH_S:  # :meth:`available` just saw it
            return await self._create(actor, session_id)
        try:
            status = await self.template(actor)
        except ServiceError:
            raise
        except Exception as exc:
            raise ServiceError(503, "vm_provider_unavailable", f"vmmgr does not answer: {exc}") from None
        if status.status in ("failed", "unavailable"):
            raise ServiceError(503, "browser_template_unavailable",
                               f"the browser template is {status.status}: {status.detail}", retry_after=60)
        if status.status != "ready":
            return None
        return await self._create(actor, session_id)

    async def _create(self, actor: Principal, session_id: str) -> tuple[str, str]:
        spec = c.CapsuleSpec(template=TEMPLATE, metadata={"browser_session": session_id})
        reply = await self.bus.request("vmmgr", c.CreateCapsule(actor=actor, spec=spec), timeout=60)
        return reply.capsule.id, reply.host_id

    async def wait_template(self, actor: Principal, session_id: str) -> tuple[str, str]:
        with trio.fail_after(TEMPLATE_WAIT_S):
            while True:
                status = await self.template(actor)
                if status.status == "ready":
                    break
                if status.status == "failed" or (status.status == "unavailable" and (
                        "disabled" in status.detail or "failed" in status.detail)):
                    raise ServiceError(503, "browser_template_unavailable",
                                       f"the browser template is {status.status}: {status.detail}")
                await trio.sleep(2)  # building, or the VM driver still coming up
        return await self._create(actor, session_id)

    async def connect(self, actor: Principal, capsule_id: str, host: str) -> GuestWebSocket:
        """Wait for the capsule to run, then the browser's DevTools WebSocket."""
        began = trio.current_time()
        try:
            with trio.fail_after(RUNNING_WAIT_S):
                while True:
                    self._changed[capsule_id] = changed = trio.Event()  # before the lookup: no race
                    reply = await self.bus.request(
                        "vmmgr", c.LookupCapsule(actor=actor, capsule_id=capsule_id), timeout=10)
                    status = reply.capsule.status
                    if status == "running":
                        break
                    if status in ("error", "missing", "stopped", "stopping"):
                        raise ServiceError(502, "vm_failed", f"the browser's capsule is {status}")
                    with trio.move_on_after(RUNNING_RECHECK_S):
                        await changed.wait()
        finally:
            self._changed.pop(capsule_id, None)
        start = cs.StreamTcp(actor=actor, capsule_id=capsule_id, port=CDP_PORT)
        running = versioned = trio.current_time()
        conn = None
        known = self._paths.get(host)
        if known is not None:
            try:
                conn = await GuestWebSocket.open(self.bus, host, start, known)
            except BrowserGone as exc:
                log.info("the known DevTools path was refused", extra={"capsule_id": capsule_id,
                                                                       "error": str(exc)})
        if conn is None:
            version = await http_get(self.bus, host, start, "/json/version")
            versioned = trio.current_time()
            url = str(version.get("webSocketDebuggerUrl", ""))
            path = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else ""
            if not path.startswith("/devtools/browser/"):
                raise BrowserGone(f"no browser endpoint in /json/version: {url!r}")
            conn = await GuestWebSocket.open(self.bus, host, start, path)
            self._paths[host] = path
        log.info("browser devtools connected", extra={
            "capsule_id": capsule_id, "until_running_ms": round((running - began) * 1000),
            "version_ms": round((versioned - running) * 1000), "known_path": known is not None,
            "websocket_ms": round((trio.current_time() - versioned) * 1000)})
        return conn

    async def destroy_leftovers(self, leftovers: list[tuple[str, str]], wait_s: float = 300.0) -> None:
        """Destroy the capsules of the VM sessions a previous run of this service left,
        retrying while vmmgr does not answer yet (``(team id, capsule id)`` pairs)."""
        with trio.move_on_after(wait_s):
            for team_id, capsule_id in leftovers:
                actor = Principal(auth_type="system", team_id=team_id)
                while True:
                    try:
                        reply = await self.bus.request(
                            "vmmgr", c.LookupCapsule(actor=actor, capsule_id=capsule_id), timeout=10)
                        if reply.capsule.status not in ("stopped", "stopping", "missing"):
                            await self.destroy(actor, capsule_id, reply.host_id)
                        break
                    except ServiceError as exc:
                        if exc.status in (400, 404):  # no such capsule (a placeholder machine id)
                            break
                        await trio.sleep(5)
                    except Exception:
                        await trio.sleep(5)

    async def destroy(self, actor: Principal, capsule_id: str, host: str) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            try:
                await self.bus.request(f"vmmgr.{host}", c.DestroyCapsule(
                    actor=actor, capsule_id=capsule_id), timeout=60)
            except ServiceError as exc:
                if exc.status != 404:
                    log.warning("could not destroy a browser capsule", extra={
                        "capsule_id": capsule_id, "error": exc.message})
            except Exception:
                log.warning("could not destroy a browser capsule", exc_info=True,
                            extra={"capsule_id": capsule_id})
