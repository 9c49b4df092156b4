"""One live browser session: its DevTools connection, the relay, the monitor and the captures.

A :class:`LiveBrowser` owns the one CDP connection to its Chromium (any object
with ``send(bytes)``, ``receive() -> bytes`` and ``aclose()``), a
:class:`~.relay.RelayCore`, and the tasks of its own nursery:

* the reader: every browser message through the core to its client's bounded
  channel (a slow client holds the reader back, so the browser is read no
  faster than the slowest client takes: order and backpressure, and memory
  bounded by the channels' sizes);
* one task pair per CDP client (a bus stream from the gateway);
* the monitor: the service's own client. It auto-attaches to every page and
  enables ``Runtime``, ``Network``, ``Page`` and ``Log`` there, so console
  messages, exceptions, requests and navigations are captured whatever the
  clients do; it takes a screenshot when a page finishes loading, answers
  health round trips and runs the planner's tools.

Console and network entries live in bounded deques (:data:`MAX_ENTRIES`) and
are written to the store when the session ends. Actions (observed from the
clients' commands by the core, or done by the planner) are written as they
happen, in order, by one writer task.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from dovecote.bus.messages import browsers as b
from dovecote.libs.logs import get_logger
from dovecote.libs.storage import Storage
from dovecote.services.browsers.relay import BROWSER, Observation, RelayCore, RelayError, action_of
from dovecote.services.browsers.store import BrowserStore
from dovecote.services.browsers.video import FrameBuffer

log = get_logger("dovecote.browsers.browser")

MAX_ENTRIES = 1000
"""Console messages and network requests kept per session (the oldest dropped)."""
CLIENT_QUEUE = 64
"""Messages buffered towards one client before the reader waits for it."""
CALL_TIMEOUT_S = 30.0
ACTION_BATCH_S = 0.5
"""How long the action writer gathers actions before one write (a client's commands in a
row cost one transaction, not one each); a read of the log flushes at once
(:meth:`LiveBrowser.flush_actions`)."""


class Connection(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def receive(self) -> bytes: ...
    async def aclose(self) -> None: ...


class CdpError(Exception):
    """A CDP command answered with an error (or not at all)."""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_of(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


CONSOLE_LEVELS = {"warning": "warn", "verbose": "debug", "assert": "error", "trace": "debug"}


def _remote_text(arg: dict[str, Any]) -> str:
    if "value" in arg:
        value = arg["value"]
        return value if isinstance(value, str) else json.dumps(value)
    return str(arg.get("description") or arg.get("unserializableValue") or arg.get("type", ""))


class LiveBrowser:
    """See the module docstring."""

    def __init__(self, *, session_id: str, team_id: str, conn: Connection, store: BrowserStore,
                 storage: Storage | None, recording: str, on_gone: Callable[[str], Awaitable[None]],
                 call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.session_id = session_id
        self.team_id = team_id
        self.conn = conn
        self.store = store
        self.storage = storage
        self.recording = recording
        self.on_gone = on_gone
        self.call_timeout_s = call_timeout_s
        """The monitor's wait for a reply (longer for a VM under TCG on a loaded host)."""
        self.core = RelayCore(time.monotonic)
        self.started_mono = time.monotonic()
        self.console: collections.deque[b.ConsoleEntry] = collections.deque(maxlen=MAX_ENTRIES)
        self.network: collections.deque[b.NetworkEntry] = collections.deque(maxlen=MAX_ENTRIES)
        self._requests: collections.OrderedDict[str, tuple[b.NetworkEntry, float]] = collections.OrderedDict()
        self._clients: dict[int, trio.MemorySendChannel[bytes]] = {}
        self._monitor_id = 0
        self._calls: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._next_call = 1
        self._pages: dict[str, str] = {}
        """page session id -> target id (pages the monitor is attached to)."""
        self.current_page: str | None = None
        self.current_url: str | None = None
        self.title: str | None = None
        self.version: dict[str, str] = {}
        self._actions_send, self._actions_recv = trio.open_memory_channel[b.Action](256)
        self._actions_logged = 0
        self._actions_written = 0
        self._flush_wanted = trio.Event()
        self._written = trio.Event()
        self._shots = trio.CapacityLimiter(1)
        self._nursery: trio.Nursery | None = None
        self._wall_offset = time.time() - time.monotonic()
        self.ended = trio.Event()
        self.page_seen = trio.Event()
        self.video = FrameBuffer()
        self._casting: str | None = None
        self.last_screenshot_at = 0.0

    @property
    def closed(self) -> bool:
        return self.ended.is_set()

    # -- life ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay and monitor until the connection ends; ready once the monitor sees a page."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                keep_stderr = getattr(self.conn, "keep_stderr", None)
                if keep_stderr is not None:  # the host provider's Chromium: drain and keep its stderr
                    nursery.start_soon(keep_stderr)
                nursery.start_soon(self._write_actions)
                nursery.start_soon(self._read)
                with trio.fail_after(max(60.0, 2 * self.call_timeout_s)):
                    await self._start_monitor()
                task_status.started()
        finally:
            self.ended.set()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(10):
                    await self._write_batch([])  # the actions still gathered
                await self._persist()

    async def close(self) -> None:
        """Kill the browser (the reader then ends the session's tasks)."""
        self.ended.set()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await self.conn.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _persist(self) -> None:
        with trio.move_on_after(10):
            try:
                await self.store.save_captures(self.session_id, list(self.console), list(self.network))
            except Exception:
                log.exception("captures not saved", extra={"session_id": self.session_id})

    # -- the reader ------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                data = await self.conn.receive()
                await self._dispatch(self.core.from_browser(data))
                await self._drain_observations()
        except Exception as exc:
            if not self.closed:
                log.warning("browser connection ended", extra={"session_id": self.session_id,
                                                                "error": str(exc)})
                self.ended.set()
                await self.on_gone(f"browser_exited: {exc}")
        finally:
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    async def _dispatch(self, outs: list[Any]) -> None:
        for out in outs:
            if out.dest == BROWSER:
                await self.conn.send(out.data)
            elif out.dest == self._monitor_id:
                self._on_monitor_message(json.loads(out.data))
            else:
                channel = self._clients.get(out.dest)
                if channel is not None:
                    try:
                        await channel.send(out.data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

    async def _drain_observations(self) -> None:
        for obs in self.core.take_observations():
            if obs.client_id == self._monitor_id:
                continue
            await self._observed(obs)

    async def _observed(self, obs: Observation) -> None:
        found = action_of(obs)
        if found is None:
            return
        kind, details = found
        if obs.error is not None:
            details = {**details, "error": str(obs.error.get("message", ""))[:300]}
        await self.log_action(b.Action(
            type=kind, timestamp=_iso_of(obs.started + self._wall_offset), success=obs.error is None,
            details=details, duration=int((obs.finished - obs.started) * 1000), source="cdp"))
        if kind == "screenshot" and obs.result and isinstance(obs.result.get("data"), str) \
                and self._nursery is not None and self.recording != "off":
            data = obs.result["data"]
            self._nursery.start_soon(self._store_screenshot, base64.b64decode(data), "request")

    async def log_action(self, action: b.Action) -> None:
        self._actions_logged += 1
        await self._actions_send.send(action)

    async def flush_actions(self, timeout_s: float = 10.0) -> bool:
        """Return once the actions logged so far are written (a reader of the log waits here);
        whether any were still unwritten."""
        target = self._actions_logged
        if self._actions_written >= target:
            return False
        with trio.move_on_after(timeout_s):
            while self._actions_written < target and not self.closed:
                self._flush_wanted.set()
                await self._written.wait()
        return True

    async def _write_actions(self) -> None:
        """Write actions in order, gathered for :data:`ACTION_BATCH_S` (or until a reader
        flushes) so that a client's fast commands go in one transaction."""
        async for action in self._actions_recv:
            batch = [action]
            with trio.move_on_after(ACTION_BATCH_S):
                await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            await self._write_batch(batch)

    async def _write_batch(self, batch: list[b.Action]) -> None:
        while len(batch) < 500:
            try:
                batch.append(self._actions_recv.receive_nowait())
            except trio.WouldBlock:
                break
        try:
            if batch:
                await self.store.add_actions(self.session_id, batch)
        except Exception:
            log.exception("actions not recorded", extra={"session_id": self.session_id})
        self._actions_written += len(batch)
        self._written.set()
        self._written = trio.Event()

    # -- CDP clients ------------------------------------------------------------------------

    async def serve_client(self, receive: Callable[[], Awaitable[bytes | None]],
                           send: Callable[[bytes], Awaitable[None]], target_id: str | None = None,
                           touch: Callable[[], Awaitable[None]] | None = None) -> None:
        """Relay one client until it leaves or the browser ends.

        ``receive`` returns the client's next message (None at its end); ``send``
        delivers a message to it.
        """
        if self._nursery is None or self.closed:
            raise RelayError("the browser is not running")
        client_id, outs = self.core.add_client(target_id)
        to_client, from_core = trio.open_memory_channel[bytes](CLIENT_QUEUE)
        self._clients[client_id] = to_client
        try:
            await self._dispatch(outs)
            async with trio.open_nursery() as nursery:

                async def pump_out() -> None:
                    async for data in from_core:
                        await send(data)

                async def pump_in() -> None:
                    last_touch = 0.0
                    while True:
                        data = await receive()
                        if data is None:
                            break
                        await self._dispatch(self.core.from_client(client_id, data))
                        await self._drain_observations()
                        if touch is not None and time.monotonic() - last_touch > 5:
                            last_touch = time.monotonic()
                            await touch()
                    nursery.cancel_scope.cancel()

                async def watch_browser() -> None:
                    await self.ended.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump_out)
                nursery.start_soon(pump_in)
                nursery.start_soon(watch_browser)
        finally:
            self._clients.pop(client_id, None)
            to_client.close()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                if not self.closed:
                    try:
                        await self._dispatch(self.core.remove_client(client_id))
                    except Exception:
                        pass
                else:
                    self.core.remove_client(client_id)

    # -- the monitor ------------------------------------------------------------------------

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   session: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """One command from the monitor; its result.

        Raises:
            CdpError: an error reply, or none within ``timeout_s``.
        """
        return (await self.calls((method, params), session=session, timeout_s=timeout_s))[0]

    async def calls(self, *commands: tuple[str, dict[str, Any] | None], session: str | None = None,
                    timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Several commands from the monitor sent at once (Chromium answers a session's
        commands in order), so they cost one round trip, not one each; their results.

        Raises:
            CdpError: an error reply, or none within ``timeout_s``.
        """
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        pending = []
        try:
            for method, params in commands:
                call_id = self._next_call
                self._next_call += 1
                message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
                if session is not None:
                    message["sessionId"] = session
                event, box = trio.Event(), list[dict[str, Any]]()
                self._calls[call_id] = (event, box)
                pending.append((call_id, method, event, box))
                await self._dispatch(self.core.from_client(self._monitor_id, json.dumps(message).encode()))
            results = []
            with trio.move_on_after(timeout_s):
                for _, _, event, _ in pending:
                    await event.wait()
            for _, method, _, box in pending:
                if not box:
                    raise CdpError(f"{method}: no answer within {timeout_s:.0f} s")
                reply = box[0]
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error'].get('message', reply['error'])}")
                results.append(reply.get("result") or {})
            return results
        finally:
            for call_id, *_ in pending:
                self._calls.pop(call_id, None)

    async def _start_monitor(self) -> None:
        self._monitor_id, outs = self.core.add_client(None)
        await self._dispatch(outs)
        version, _, _ = await self.calls(
            ("Browser.getVersion", None), ("Target.setDiscoverTargets", {"discover": True}),
            ("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": False,
                                      "flatten": True}))
        self.version = {k: str(v) for k, v in version.items()}
        await self.page_seen.wait()

    def _on_monitor_message(self, message: dict[str, Any]) -> None:
        if "id" in message:
            pending = self._calls.get(message["id"])
            if pending is not None:
                pending[1].append(message)
                pending[0].set()
            return
        method = message.get("method", "")
        params = message.get("params") or {}
        session = message.get("sessionId")
        handler = getattr(self, "_on_" + method.replace(".", "_"), None)
        if handler is not None:
            handler(params, session)

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is not None and not self.closed:
            self._nursery.start_soon(fn, *args)

    def _on_Target_attachedToTarget(self, params: dict[str, Any], session: str | None) -> None:
        info = params.get("targetInfo") or {}
        child = params.get("sessionId")
        if info.get("type") != "page" or not isinstance(child, str):
            return
        self._spawn(self._watch_page, child, str(info.get("targetId", "")))

    async def _watch_page(self, session: str, target_id: str) -> None:
        try:
            await self.calls(("Page.enable", None), ("Runtime.enable", None), ("Network.enable", None),
                             ("Log.enable", None), ("Runtime.runIfWaitingForDebugger", None),
                             session=session)
        except CdpError as exc:
            log.info("page not watched", extra={"session_id": self.session_id, "error": str(exc)})
            return
        self._pages[session] = target_id
        if self.current_page is None:
            self.current_page = session
        self.page_seen.set()
        if self.recording == "video" and self._casting is None:
            self._casting = session
            try:
                await self.call("Page.startScreencast", {
                    "format": "jpeg", "quality": 70, "maxWidth": 1280, "maxHeight": 800, "everyNthFrame": 1,
                }, session=session)
            except CdpError as exc:
                log.info("no screencast", extra={"session_id": self.session_id, "error": str(exc)})

    def _on_Page_screencastFrame(self, params: dict[str, Any], session: str | None) -> None:
        if session != self._casting or not isinstance(params.get("data"), str):
            return
        stamp = (params.get("metadata") or {}).get("timestamp")
        try:
            jpeg = base64.b64decode(params["data"])
        except ValueError:
            return
        self.video.add(float(stamp) if isinstance(stamp, (int, float)) else time.time(), jpeg)
        self._spawn(self._ack_frame, session, params.get("sessionId"))

    async def _ack_frame(self, session: str, frame: Any) -> None:
        with contextlib.suppress(CdpError):
            await self.call("Page.screencastFrameAck", {"sessionId": frame}, session=session, timeout_s=10)

    def _on_Target_detachedFromTarget(self, params: dict[str, Any], session: str | None) -> None:
        gone = params.get("sessionId")
        self._pages.pop(gone, None) if isinstance(gone, str) else None
        if self.current_page == gone:
            self.current_page = next(iter(self._pages), None)

    def _on_Target_targetInfoChanged(self, params: dict[str, Any], session: str | None) -> None:
        info = params.get("targetInfo") or {}
        current = self._pages.get(self.current_page or "")
        if info.get("type") == "page" and info.get("targetId") == current:
            self.title = info.get("title") or self.title
            self.current_url = info.get("url") or self.current_url
            self._spawn(self.store.set_page, self.session_id, self.current_url, self.title)

    def _on_Page_frameNavigated(self, params: dict[str, Any], session: str | None) -> None:
        frame = params.get("frame") or {}
        if frame.get("parentId") or not isinstance(session, str):
            return
        self.current_page = session
        url = str(frame.get("url", ""))
        self.current_url = url
        self.title = None
        self._spawn(self.store.add_navigation, self.session_id, b.Navigation(url=url, timestamp=now_iso()))

    def _on_Page_loadEventFired(self, params: dict[str, Any], session: str | None) -> None:
        if not isinstance(session, str):
            return
        self._spawn(self._refresh_title, session)
        if self.recording != "off":
            self._spawn(self._screenshot_page, session, "navigation")

    async def _refresh_title(self, session: str) -> None:
        try:
            result = await self.call("Runtime.evaluate",
                                     {"expression": "document.title", "returnByValue": True},
                                     session=session)
        except CdpError:
            return
        title = (result.get("result") or {}).get("value")
        if isinstance(title, str) and session == self.current_page:
            self.title = title
            await self.store.set_page(self.session_id, self.current_url, title)

    def _on_Runtime_consoleAPICalled(self, params: dict[str, Any], session: str | None) -> None:
        level = str(params.get("type", "log"))
        text = " ".join(_remote_text(a) for a in params.get("args") or [])
        self.console.append(b.ConsoleEntry(level=CONSOLE_LEVELS.get(level, level), message=text[:4000],
                                           timestamp=self._stamp(params.get("timestamp"), ms=True)))

    def _on_Runtime_exceptionThrown(self, params: dict[str, Any], session: str | None) -> None:
        details = params.get("exceptionDetails") or {}
        exception = details.get("exception") or {}
        text = str(exception.get("description") or details.get("text") or "exception")
        self.console.append(b.ConsoleEntry(level="error", message=text[:4000],
                                           timestamp=self._stamp(params.get("timestamp"), ms=True)))

    def _on_Log_entryAdded(self, params: dict[str, Any], session: str | None) -> None:
        entry = params.get("entry") or {}
        level = str(entry.get("level", "info"))
        text = str(entry.get("text", ""))
        if entry.get("url") and entry.get("source") == "network":
            text = f"{text} ({entry['url']})"
        self.console.append(b.ConsoleEntry(level=CONSOLE_LEVELS.get(level, level), message=text[:4000],
                                           timestamp=self._stamp(entry.get("timestamp"), ms=True)))

    def _on_Network_requestWillBeSent(self, params: dict[str, Any], session: str | None) -> None:
        request = params.get("request") or {}
        key = f"{session}:{params.get('requestId')}"
        if key in self._requests and params.get("redirectResponse"):
            entry, _ = self._requests[key]
            entry.status = int(params["redirectResponse"].get("status", 0)) or None
        entry = b.NetworkEntry(url=str(request.get("url", ""))[:2000],
                               method=str(request.get("method", "GET")),
                               status=None, duration=None, size=None, type=params.get("type"))
        self.network.append(entry)
        self._requests[key] = (entry, float(params.get("timestamp") or 0.0))
        while len(self._requests) > MAX_ENTRIES:
            self._requests.popitem(last=False)

    def _on_Network_responseReceived(self, params: dict[str, Any], session: str | None) -> None:
        found = self._requests.get(f"{session}:{params.get('requestId')}")
        if found is not None:
            response = params.get("response") or {}
            found[0].status = int(response.get("status", 0))
            if response.get("encodedDataLength"):
                found[0].size = int(response["encodedDataLength"])

    def _on_Network_loadingFinished(self, params: dict[str, Any], session: str | None) -> None:
        found = self._requests.pop(f"{session}:{params.get('requestId')}", None)
        if found is not None:
            entry, started = found
            entry.size = int(params.get("encodedDataLength") or entry.size or 0)
            if started and params.get("timestamp"):
                entry.duration = max(0, int((float(params["timestamp"]) - started) * 1000))

    def _on_Network_loadingFailed(self, params: dict[str, Any], session: str | None) -> None:
        found = self._requests.pop(f"{session}:{params.get('requestId')}", None)
        if found is not None:
            entry, started = found
            entry.error = str(params.get("errorText", "failed"))
            if started and params.get("timestamp"):
                entry.duration = max(0, int((float(params["timestamp"]) - started) * 1000))

    @staticmethod
    def _stamp(value: Any, *, ms: bool) -> str:
        if isinstance(value, (int, float)) and value > 0:
            return _iso_of(value / 1000 if ms else value)
        return now_iso()

    # -- screenshots and artifacts -------------------------------------------------------------

    async def _screenshot_page(self, session: str, why: str) -> None:
        try:
            async with self._shots:
                result = await self.call("Page.captureScreenshot", {"format": "png"}, session=session)
            await self._store_screenshot(base64.b64decode(result["data"]), why)
        except (CdpError, KeyError, ValueError) as exc:
            log.info("screenshot not taken", extra={"session_id": self.session_id, "error": str(exc)})

    async def _store_screenshot(self, png: bytes, why: str) -> str | None:
        return await self.store_artifact("screenshot", png, "image/png", "png")

    async def store_artifact(self, kind: str, data: bytes, content_type: str, ext: str) -> str | None:
        if self.storage is None:
            return None
        object_id = "obj-" + uuid.uuid4().hex[:16]
        key = f"browsers/{self.team_id}/{self.session_id}/{object_id}.{ext}"
        at = now_iso()
        try:
            await self.storage.put(key, data, content_type)
            await self.store.add_artifact(object_id=object_id, session_id=self.session_id, kind=kind,
                                          key=key, at=at)
        except Exception:
            log.exception("artifact not stored", extra={"session_id": self.session_id})
            return None
        if kind == "screenshot":
            self.last_screenshot_at = time.monotonic()
        return object_id

    async def screenshot(self) -> bytes:
        """A screenshot of the current page (PNG), stored as an artifact."""
        if self.current_page is None:
            raise CdpError("no page")
        async with self._shots:
            result = await self.call("Page.captureScreenshot", {"format": "png"}, session=self.current_page)
        png = base64.b64decode(result["data"])
        if self.recording != "off":
            await self._store_screenshot(png, "request")
        return png

    # -- page helpers (initial navigation, planner tools, health) -------------------------------

    async def responsive(self, timeout_s: float = 5.0) -> bool:
        try:
            await self.call("Browser.getVersion", timeout_s=timeout_s)
        except CdpError:
            return False
        return True

    async def navigate(self, url: str, timeout_s: float | None = None) -> None:
        if self.current_page is None:
            raise CdpError("no page")
        timeout_s = max(60.0, 2 * self.call_timeout_s) if timeout_s is None else timeout_s
        result = await self.call("Page.navigate", {"url": url}, session=self.current_page,
                                 timeout_s=timeout_s)
        if result.get("errorText"):
            raise CdpError(f"navigation failed: {result['errorText']}")
        await self._wait_loaded(timeout_s)

    async def _wait_loaded(self, timeout_s: float) -> None:
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    state = await self.evaluate("document.readyState")
                except CdpError:  # the old document went away mid-navigation; ask the new one
                    state = None
                if state == "complete":
                    return
                await trio.sleep(0.1)

    async def evaluate(self, expression: str) -> Any:
        if self.current_page is None:
            raise CdpError("no page")
        result = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True}, session=self.current_page)
        if result.get("exceptionDetails"):
            details = result["exceptionDetails"]
            raise CdpError(str((details.get("exception") or {}).get("description") or details.get("text")))
        return (result.get("result") or {}).get("value")
