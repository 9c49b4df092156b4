"""The browsers service: browser sessions driven over CDP (``/browser/api/sessions*``).

This is the service's process entry: ``dovecote browsers`` runs :data:`SPEC`.
It answers :data:`~dovecote.bus.messages.browsers.BrowserRequest` and serves
:class:`~dovecote.bus.messages.browsers.OpenCdp` streams (one DevTools client
each, relayed by the session's :class:`~.browser.LiveBrowser`).

Create answers at once (``creating``, the machine id) and provisions in the
background; a session that cannot provision ends ``failed`` with a reason.
Providers (``DOVECOTE_BROWSER_PROVIDER``: ``auto``, ``vm`` or ``host``):
``vm`` (:mod:`.vm`: a capsule restored from the browser template through
vmmgr, Chromium already running in it; ``machineId`` is the capsule id, known
at create once the template is built, set when the capsule is made otherwise)
is the default where vmmgr runs a VM driver; ``host``
(``DOVECOTE_BROWSER_HOST=true``: Chromium in a bubblewrap sandbox on the host,
:mod:`.host`, weaker isolation) is the fallback ``auto`` picks where none runs.
Without either a session ends ``failed`` with ``vm_provider_unavailable``.
Sessions count against the team's capsule cap (``DOVECOTE_TEAM_MAX_CAPSULES``,
capsules from vmmgr, a VM session's among them, plus live host sessions). Idle sessions (no API call and no
CDP command for ``DOVECOTE_BROWSER_IDLE_TIMEOUT_S``) end ``completed``.

CDP tokens: ``<expires>.<hmac>`` over the session id and the expiry with a key
made at process start (the sessions die with the process anyway); valid for
``DOVECOTE_BROWSER_TOKEN_TTL_S``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import os
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import trio

from dovecote.bus.messages import browsers as b
from dovecote.bus.messages.common import Principal
from dovecote.libs.config import BaseConfig
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.planner import ModelConfig, Planner, PlannerError, Step, model_from_env
from dovecote.libs.runtime import ServiceContext, ServiceSpec
from dovecote.libs.storage import Storage, storage_from_env
from dovecote.services.browsers import host
from dovecote.services.browsers.browser import CdpError, LiveBrowser, now_iso
from dovecote.services.browsers.relay import RelayError
from dovecote.services.browsers.status import end_status_of, is_terminal
from dovecote.services.browsers.store import BrowserStore, iso
from dovecote.services.browsers.video import encode_webm
from dovecote.services.browsers.vm import TEMPLATE_WINDOW, VmProvider

log = get_logger("dovecote.browsers")

Seconds = Annotated[float, msgspec.Meta(gt=0)]
VM_CALL_TIMEOUT_S = 120.0
"""The monitor's wait for a reply in a VM session: Chromium under TCG on a loaded 2-core host
was seen taking over 30 s for a ``Runtime.evaluate`` while a page loaded."""
URL_SCHEMES = ("http", "https", "data", "about")
BARE_HOST = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z][A-Za-z0-9-]*(:\d{1,5})?(/\S*)?")
"""``example.com/path``: a host name with a letter in its last label (``1.5`` is no URL)."""


class BrowsersConfig(BaseConfig, kw_only=True):
    """Settings of the browsers service (``DOVECOTE_*`` variables)."""

    browser_host: bool = False
    """Enable the host provider (weaker isolation: a sandbox on the host kernel)."""
    browser_host_user: str = "dovecote-browser"
    browser_provider: Literal["auto", "vm", "host"] = "auto"
    """``auto``: the VM provider where vmmgr runs a VM driver, else the host provider if enabled."""
    browser_idle_timeout_s: Seconds = 900.0
    browser_provision_timeout_s: Seconds = 90.0
    browser_token_ttl_s: Annotated[int, msgspec.Meta(ge=10, le=86400)] = 600
    browser_idle_scan_s: Seconds = 5.0
    team_max_capsules: Annotated[int, msgspec.Meta(ge=1)] = 10


def session_not_found() -> ServiceError:
    """The refusal for an unknown session, or another team's (404, never 403: ids do not leak)."""
    return ServiceError(404, "session_not_found", "no such browser session")


def is_url(prompt: str) -> bool:
    """Whether an ``initialPrompt`` is a URL to open (else it is a task for the planner)."""
    text = prompt.strip()
    if text.lower().startswith("data:") and "," in text and "\n" not in text:
        return True  # browsers take unencoded spaces in data: URLs
    if not text or any(c.isspace() for c in text):
        return False
    if BARE_HOST.fullmatch(text):
        return True  # example.com/path: opened as https://
    parts = urlsplit(text)
    if parts.scheme in ("http", "https"):
        return bool(parts.netloc)
    return parts.scheme in URL_SCHEMES and bool(parts.path or parts.netloc)


def url_of(prompt: str) -> str:
    """The URL an ``initialPrompt`` that :func:`is_url` accepted opens."""
    text = prompt.strip()
    return "https://" + text if BARE_HOST.fullmatch(text) else text


class Tokens:
    """Short-lived CDP tokens bound to one session."""

    def __init__(self, ttl_s: int, key: bytes | None = None) -> None:
        self.ttl_s = ttl_s
        self.key = key or secrets.token_bytes(32)

    def _sig(self, session_id: str, expires: int) -> str:
        mac = hmac.new(self.key, f"{session_id}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def mint(self, session_id: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.ttl_s)
        return f"{expires}.{self._sig(session_id, expires)}"

    def check(self, session_id: str, token: str, now: float | None = None) -> bool:
        expires_text, _, sig = token.partition(".")
        if not expires_text.isdigit() or len(token) > 200:
            return False
        expires = int(expires_text)
        if expires < (now or time.time()):
            return False
        return hmac.compare_digest(sig, self._sig(session_id, expires))


class Browsers:
    """Live sessions of this process and the operations on them."""

    def __init__(self, *, config: BrowsersConfig, store: BrowserStore, storage: Storage | None,
                 nursery: trio.Nursery, bus: Any, model: ModelConfig | None) -> None:
        self.config = config
        self.store = store
        self.storage = storage
        self.nursery = nursery
        self.bus = bus
        self.model = model
        self.tokens = Tokens(config.browser_token_ttl_s)
        self.live: dict[str, LiveBrowser] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self._user: host.SandboxUser | None = None
        self.vm = VmProvider(bus)
        self._no_vm: set[str] = set()
        self.capsules: dict[str, tuple[Principal, str, str]] = {}
        """session id -> (actor, capsule id, host) of the VM sessions of this process."""

    def session_dir(self, session_id: str) -> Path:
        """The session's own files in the data directory (a host browser's stderr tail)."""
        return Path(self.config.data_dir) / "browsers" / session_id

    # -- lookups ------------------------------------------------------------------------

    async def row(self, actor: Principal | None, session_id: str) -> dict[str, Any]:
        row = await self.store.row(session_id, actor.team_id if actor is not None else None)
        if row is None:
            raise session_not_found()
        return row

    def detail(self, row: dict[str, Any]) -> b.SessionDetail:
        error = b.SessionError(code=row["error_code"], message=row["error_message"] or "") \
            if row["error_code"] else None
        live = self.live.get(row["id"])
        return b.SessionDetail(
            sessionId=row["id"], status=row["status"], machineId=row["machine_id"],
            currentUrl=(live.current_url if live and live.current_url else row["current_url"]),
            title=(live.title if live and live.title else row["title"]),
            actionCount=int(row["action_count"]), screenshotCount=int(row["screenshot_count"]),
            duration=max(0, int(row["duration_ms"])), createdAt=iso(row["created_at"]) or "",
            startedAt=iso(row["started_at"]), endedAt=iso(row["ended_at"]),
            navigationHistory=msgspec.convert(row["navigations"], list[b.Navigation]),
            initialPrompt=row["initial_prompt"], viewport=msgspec.convert(row["viewport"], b.Viewport),
            provider=row["provider"], isolation=host.ISOLATION if row["provider"] == "host" else "vm",
            error=error, statusHistory=row["status_history"])

    # -- create -------------------------------------------------------------------------

    async def create(self, actor: Principal, body: b.CreateBody) -> b.Created:
        await self.check_caps(actor)
        session_id = "session-" + uuid.uuid4().hex[:16]
        machine_id = uuid.uuid4().hex[:8]
        provider, usable = await self.provider()
        capsule: tuple[str, str] | None = None
        if provider == "vm" and usable and self._vm_usable(body):
            capsule = await self._try_capsule(actor, session_id)
            if capsule is not None:
                machine_id = capsule[0]
                self.capsules[session_id] = (actor, *capsule)
        await self.store.insert(session_id=session_id, team_id=actor.team_id, host_id=self.config.host_id,
                                machine_id=machine_id, provider=provider, body=body)
        scope = trio.CancelScope()
        self.scopes[session_id] = scope
        if provider == "vm" and not usable:
            self._no_vm.add(session_id)
        self.nursery.start_soon(self._provision, scope, session_id, actor, body, provider)
        return b.Created(sessionId=session_id, status="creating", machineId=machine_id)

    async def provider(self) -> tuple[str, bool]:
        """The provider of a new session (see the module docstring), and for ``vm`` whether a VM
        driver runs (a session without one fails with ``vm_provider_unavailable``)."""
        choice = self.config.browser_provider
        if choice == "host":
            return "host", False
        usable, _ = await self.vm.available()
        if choice == "auto" and not usable and self.config.browser_host:
            return "host", False
        return "vm", usable

    async def _try_capsule(self, actor: Principal, session_id: str) -> tuple[str, str] | None:
        """The session's capsule, restored now when the template is ready; a template that is
        not (503) leaves it to the background, which fails the session with the reason."""
        try:
            return await self.vm.create_capsule(actor, session_id)
        except ServiceError as exc:
            if exc.status == 503:
                return None
            raise

    def _vm_usable(self, body: b.CreateBody) -> bool:
        """False when the session fails before any VM is needed (a task without a model)."""
        prompt = body.initialPrompt
        return prompt is None or is_url(prompt) or self.model is not None

    async def check_caps(self, actor: Principal) -> None:
        """429 when the team's capsules and browser sessions already reach its capsule cap."""
        sessions = await self.store.count_live(actor.team_id)
        capsules = 0
        if self.bus is not None:
            from dovecote.bus.messages.capsules import ListCapsules

            with contextlib.suppress(Exception):  # vmmgr away: the sessions still count
                reply = await self.bus.request("vmmgr", ListCapsules(actor=actor), timeout=5)
                capsules = sum(1 for c in reply.capsules if c.status not in ("stopped", "missing", "error"))
        limit = self.config.team_max_capsules
        if capsules + sessions + 1 > limit:
            raise ServiceError(429, "quota_capsules",
                               f"the team already runs {capsules} capsules and {sessions} browser "
                               f"sessions (limit {limit}); end one first")

    async def _provision(self, scope: trio.CancelScope, session_id: str, actor: Principal,
                         body: b.CreateBody, provider: str) -> None:
        with scope:
            try:
                await self._run_session(session_id, actor, body, provider)
            except Exception as exc:
                log.warning("browser session failed", extra={"session_id": session_id, "error": str(exc)})
                code, message = _reason_of(exc)
                await self.end(session_id, "failed", code=code, message=message)
        self.scopes.pop(session_id, None)
        self._no_vm.discard(session_id)
        vm = self.capsules.pop(session_id, None)
        if vm is not None:  # the session is over: its VM goes
            await self.vm.destroy(*vm)

    async def _launch(self, session_id: str, actor: Principal, provider: str,
                      viewport: b.Viewport) -> Any:
        """The session's DevTools connection, from its provider."""
        if provider == "vm" and session_id in self._no_vm:
            raise ServiceError(503, "vm_provider_unavailable",
                               "the browser template (a VM with Chromium) is not available on this host "
                               "(no VM driver runs); the operator may enable DOVECOTE_BROWSER_HOST=true "
                               "(weaker isolation)")
        if provider == "vm":
            vm = self.capsules.get(session_id)
            if vm is None:  # the template was being built at create: the capsule is made now
                capsule_id, host_id = await self.vm.wait_template(actor, session_id)
                self.capsules[session_id] = vm = (actor, capsule_id, host_id)
                await self.store.set_machine(session_id, capsule_id)
            with trio.fail_after(self.config.browser_provision_timeout_s):
                return await self.vm.connect(*vm)
        if not self.config.browser_host:
            raise ServiceError(503, "vm_provider_unavailable",
                               "the browser template (a VM with Chromium) is not available on this host; "
                               "the operator may enable DOVECOTE_BROWSER_HOST=true (weaker isolation)")
        missing = host.missing_tools()
        if missing:
            raise ServiceError(424, "missing_tool", f"the host provider needs {', '.join(missing)}")
        if self._user is None:
            self._user = await trio.to_thread.run_sync(host.ensure_user, self.config.browser_host_user)
        with trio.fail_after(self.config.browser_provision_timeout_s):
            return await host.launch(self._user, viewport.width, viewport.height, session_id=session_id,
                                     stderr_log=self.session_dir(session_id) / "chromium-stderr.log")

    async def _run_session(self, session_id: str, actor: Principal, body: b.CreateBody,
                           provider: str) -> None:
        prompt = body.initialPrompt
        if prompt is not None and not is_url(prompt) and self.model is None:
            raise PlannerError("the initialPrompt is a task, and no model is configured "
                               "(DOVECOTE_MODEL_BASE_URL and DOVECOTE_MODEL)", code="planner_unavailable")
        viewport = body.options.viewport
        began = time.monotonic()
        conn = await self._launch(session_id, actor, provider, viewport)
        launched = time.monotonic()
        team_id = actor.team_id
        live = LiveBrowser(session_id=session_id, team_id=team_id, conn=conn, store=self.store,
                           storage=self.storage, recording=body.options.recording,
                           on_gone=lambda reason: self._gone(session_id, reason, provider),
                           call_timeout_s=VM_CALL_TIMEOUT_S if provider == "vm" else 30.0)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(self.config.browser_provision_timeout_s):
                    await nursery.start(live.run)
                monitored = time.monotonic()
                self.live[session_id] = live
                with trio.fail_after(live.call_timeout_s):
                    async with trio.open_nursery() as sizing:  # both at once
                        sizing.start_soon(functools.partial(
                            live.call, "Emulation.setDeviceMetricsOverride", {
                                "width": viewport.width, "height": viewport.height,
                                "deviceScaleFactor": 1, "mobile": False}, session=live.current_page))
                        if provider == "vm" and (viewport.width, viewport.height) != TEMPLATE_WINDOW:
                            # the frozen browser's window is 1280x800: new pages too
                            sizing.start_soon(_set_window, live, viewport)
                sized = time.monotonic()
                if not await self.store.transition(session_id, "creating", "running"):
                    await live.close()
                    return
                log.info("browser session running", extra={
                    "session_id": session_id, "provider": provider,
                    "launch_ms": round((launched - began) * 1000),
                    "monitor_ms": round((monitored - launched) * 1000),
                    "viewport_ms": round((sized - monitored) * 1000),
                    "running_ms": round((time.monotonic() - sized) * 1000)})
                if prompt is not None:
                    nursery.start_soon(self._initial, live, prompt)
        finally:
            self.live.pop(session_id, None)
            await live.close()

    async def _initial(self, live: LiveBrowser, prompt: str) -> None:
        if is_url(prompt):
            started = time.monotonic()
            at = now_iso()
            try:
                await live.navigate(url_of(prompt))
                ok, error = True, None
            except CdpError as exc:
                ok, error = False, str(exc)
            details: dict[str, Any] = {"url": url_of(prompt)}
            if error:
                details["error"] = error
            await live.log_action(b.Action(type="navigate", timestamp=at, success=ok, details=details,
                                           duration=int((time.monotonic() - started) * 1000),
                                           source="system"))
            return
        assert self.model is not None
        tools = PageTools(live)

        async def on_step(step: Step) -> None:
            for i, run in enumerate(step.tools):
                cost = b.Cost(tokens=step.tokens, price=step.price) if i == 0 else b.Cost()
                await live.log_action(b.Action(
                    type=run.name, timestamp=tools.started_at.get(id(run.arguments), now_iso()),
                    success=run.success, details={**run.arguments, "result": run.result[:300]},
                    duration=tools.durations.get(id(run.arguments), 0), cost=cost, source="planner"))
            if not step.tools:
                await live.log_action(b.Action(type="think", timestamp=now_iso(), success=True, details={},
                                               duration=0, cost=b.Cost(tokens=step.tokens, price=step.price),
                                               source="planner"))

        try:
            await Planner(self.model).run(prompt, tools, on_step)
        except PlannerError as exc:
            await self.end(live.session_id, "failed", code=exc.code, message=str(exc))

    async def _gone(self, session_id: str, reason: str, provider: str = "host") -> None:
        if provider == "vm":
            await self.end(session_id, "failed", code="vm_exited",
                           message=f"the browser's VM or its DevTools connection is gone: {reason}")
            return
        await self.end(session_id, "failed", code="browser_exited", message=reason)

    # -- end ------------------------------------------------------------------------------

    async def end(self, session_id: str, target: str, *, code: str | None = None,
                  message: str | None = None) -> bool:
        """Move the session to a terminal status (if it is not already) and stop its browser."""
        with trio.CancelScope(shield=True):
            changed = False
            for current in ("creating", "running"):
                if await self.store.transition(session_id, current, target, error_code=code,
                                               error_message=message):
                    changed = True
                    break
            live = self.live.pop(session_id, None)
            if live is not None:
                await self._write_recording(live)
                await live.close()
            scope = self.scopes.get(session_id)
            if scope is not None:
                scope.cancel()
        return changed

    async def _write_recording(self, live: LiveBrowser) -> None:
        """The sparse timeline (navigations, actions, screenshots) as JSON; the video if asked for."""
        if live.recording == "off" or self.storage is None:
            return
        with trio.move_on_after(10):
            try:
                row = await self.store.row(live.session_id)
                shots = await self.store.artifacts(live.session_id)
                actions, _ = await self.store.actions(live.session_id, 0, 1000)
                timeline = {
                    "sessionId": live.session_id, "mode": "sparse_timeline",
                    "navigations": row["navigations"] if row else [],
                    "actions": [msgspec.to_builtins(a) for a in actions],
                    "screenshots": [{"objectId": s["object_id"], "timestamp": iso(s["at"])}
                                    for s in shots if s["type"] == "screenshot"],
                }
                await live.store_artifact("recording", msgspec.json.encode(timeline), "application/json",
                                          "json")
            except Exception:
                log.exception("recording not written", extra={"session_id": live.session_id})
        if live.recording == "video" and live.video.frames:
            with trio.move_on_after(120):
                try:
                    webm = await trio.to_thread.run_sync(encode_webm, list(live.video.frames))
                    await live.store_artifact("video", webm, "video/webm", "webm")
                except Exception:
                    log.exception("video not written", extra={"session_id": live.session_id})

    async def delete(self, actor: Principal, session_id: str) -> None:
        row = await self.row(actor, session_id)
        if is_terminal(row["status"]):
            return
        await self.end(session_id, end_status_of("deleted"))

    async def serve_idle(self) -> None:
        while True:
            await trio.sleep(self.config.browser_idle_scan_s)
            try:
                for session_id in await self.store.idle(self.config.browser_idle_timeout_s):
                    if session_id in self.live:
                        log.info("idle browser session ended", extra={"session_id": session_id})
                        await self.end(session_id, end_status_of("idle_timeout"), code="idle_timeout",
                                       message=f"no activity for {self.config.browser_idle_timeout_s:.0f} s")
            except Exception:
                log.exception("idle scan failed")

    async def stop_all(self) -> None:
        for session_id in list(self.live) + list(self.scopes):
            await self.end(session_id, "cancelled", code="shutdown", message="the service stopped")

    async def running(self, actor: Principal | None, session_id: str,
                      token: str | None = None) -> LiveBrowser:
        if actor is None and not (token and self.tokens.check(session_id, token)):
            raise ServiceError(401, "unauthorized", "a valid x-api-key or CDP token is required")
        row = await self.row(actor, session_id)
        live = self.live.get(session_id)
        if row["status"] != "running" or live is None or live.closed:
            raise ServiceError(409, "session_not_running", f"the session is {row['status']}")
        return live


async def _set_window(live: LiveBrowser, viewport: b.Viewport) -> None:
    """The browser window of the session's first page at the viewport's size (best effort)."""
    target = live._pages.get(live.current_page or "")
    if not target:
        return
    with contextlib.suppress(CdpError):
        window = await live.call("Browser.getWindowForTarget", {"targetId": target}, timeout_s=10)
        await live.call("Browser.setWindowBounds", {"windowId": window["windowId"], "bounds": {
            "width": viewport.width, "height": viewport.height}}, timeout_s=10)


class PageTools:
    """The planner's tools on the session's current page."""

    def __init__(self, live: LiveBrowser) -> None:
        self.live = live
        self.durations: dict[int, int] = {}
        self.started_at: dict[int, str] = {}

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        started = time.monotonic()
        self.started_at[id(arguments)] = now_iso()
        try:
            return await self._call(name, arguments)
        finally:
            self.durations[id(arguments)] = int((time.monotonic() - started) * 1000)

    async def _call(self, name: str, arguments: dict[str, Any]) -> str:
        live = self.live
        selector = msgspec.json.encode(str(arguments.get("selector", ""))).decode()
        if name == "navigate":
            await live.navigate(str(arguments["url"]))
            return f"opened {live.current_url}"
        if name == "click":
            await live.evaluate(f"(() => {{ const e = document.querySelector({selector}); "
                                f"if (!e) throw new Error('no element matches ' + {selector}); "
                                f"e.click(); }})()")
            return "clicked"
        if name == "type":
            text = msgspec.json.encode(str(arguments.get("text", ""))).decode()
            await live.evaluate(f"(() => {{ const e = document.querySelector({selector}); "
                                f"if (!e) throw new Error('no element matches ' + {selector}); e.focus(); "
                                f"e.value = {text}; e.dispatchEvent(new Event('input', {{bubbles: true}})); "
                                f"e.dispatchEvent(new Event('change', {{bubbles: true}})); }})()")
            return "typed"
        if name == "scroll":
            await live.evaluate(f"window.scrollBy(0, {float(arguments.get('deltaY', 0))})")
            return "scrolled"
        if name == "extract_text":
            if arguments.get("selector"):
                value = await live.evaluate(f"(document.querySelector({selector}) || {{}}).innerText || ''")
            else:
                value = await live.evaluate("document.body ? document.body.innerText : ''")
            return str(value)
        if name == "screenshot":
            png = await live.screenshot()
            return f"screenshot taken ({len(png)} bytes)"
        raise ValueError(f"unknown tool {name!r}")


def _reason_of(exc: BaseException) -> tuple[str, str]:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, PlannerError):
        return exc.code, str(exc)
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, trio.TooSlowError):
        return "provision_timeout", "the browser did not start in time"
    return "provision_failed", f"{type(exc).__name__}: {exc}"


class BrowserHandlers:
    """The bus handlers of the browsers service."""

    def __init__(self, browsers: Browsers) -> None:
        self.browsers = browsers
        self.store = browsers.store

    def register(self, ctx: ServiceContext[Any]) -> None:
        for message, handler in (
                (b.CreateSession, self.create), (b.ListSessions, self.list), (b.GetSession, self.get),
                (b.DeleteSession, self.delete), (b.GetActions, self.actions),
                (b.GetArtifacts, self.artifacts), (b.GetConsole, self.console),
                (b.GetNetwork, self.network), (b.GetHealth, self.health),
                (b.GetDiscovery, self.discovery)):
            ctx.handle(message, handler)
        ctx.handle_stream(b.OpenCdp, self.cdp)

    async def _flush_actions(self, session_id: str) -> bool:
        """Whether actions of the session were still being gathered (now written)."""
        live = self.browsers.live.get(session_id)
        return live is not None and await live.flush_actions()

    async def _touch(self, session_id: str) -> None:
        if session_id in self.browsers.live:
            await self.store.touch(session_id)

    async def create(self, msg: b.CreateSession) -> b.CreatedReply:
        return b.CreatedReply(created=await self.browsers.create(msg.actor, msg.body))

    async def list(self, msg: b.ListSessions) -> b.PageReply:
        rows, total = await self.store.page(msg.actor.team_id, msg.query)
        sessions = []
        for r in rows:
            live = self.browsers.live.get(r["id"])
            sessions.append(b.SessionSummary(
                sessionId=r["id"], status=r["status"],
                currentUrl=live.current_url if live and live.current_url else r["current_url"],
                createdAt=iso(r["created_at"]) or "", navigationCount=int(r["nav_count"])))
        return b.PageReply(page=b.SessionPage(sessions=sessions, total=total,
                                              hasMore=msg.query.offset + len(rows) < total))

    async def get(self, msg: b.GetSession) -> b.DetailReply:
        row = await self.browsers.row(msg.actor, msg.session_id)
        if await self._flush_actions(msg.session_id):  # its actionCount
            row = await self.browsers.row(msg.actor, msg.session_id)
        await self._touch(msg.session_id)
        token = self.browsers.tokens.mint(msg.session_id) if row["status"] == "running" else None
        return b.DetailReply(session=self.browsers.detail(row), cdp_token=token)

    async def delete(self, msg: b.DeleteSession) -> b.TerminatedReply:
        await self.browsers.delete(msg.actor, msg.session_id)
        return b.TerminatedReply(result=b.Terminated(success=True, message="Session terminated"))

    async def actions(self, msg: b.GetActions) -> b.ActionsReply:
        await self.browsers.row(msg.actor, msg.session_id)
        await self._flush_actions(msg.session_id)
        actions, total = await self.store.actions(msg.session_id, msg.query.offset, msg.query.limit)
        return b.ActionsReply(page=b.ActionPage(actions=actions, total=total))

    async def artifacts(self, msg: b.GetArtifacts) -> b.ArtifactsReply:
        await self.browsers.row(msg.actor, msg.session_id)
        storage = self.browsers.storage
        out = []
        for r in await self.store.artifacts(msg.session_id):
            url = await storage.presign(r["storage_key"], msg.expires_s) if storage is not None else ""
            out.append(b.Artifact(objectId=r["object_id"], type=r["type"], publicUrl=url,
                                  timestamp=iso(r["at"]) or ""))
        return b.ArtifactsReply(artifacts=out)

    async def console(self, msg: b.GetConsole) -> b.ConsoleReply:
        await self.browsers.row(msg.actor, msg.session_id)
        live = self.browsers.live.get(msg.session_id)
        if live is not None:
            return b.ConsoleReply(logs=list(live.console))
        logs, _ = await self.store.captures(msg.session_id)
        return b.ConsoleReply(logs=logs)

    async def network(self, msg: b.GetNetwork) -> b.NetworkReply:
        await self.browsers.row(msg.actor, msg.session_id)
        live = self.browsers.live.get(msg.session_id)
        if live is not None:
            return b.NetworkReply(requests=list(live.network))
        _, requests = await self.store.captures(msg.session_id)
        return b.NetworkReply(requests=requests)

    async def health(self, msg: b.GetHealth) -> b.HealthReply:
        row = await self.browsers.row(msg.actor, msg.session_id)
        live = self.browsers.live.get(msg.session_id)
        responsive = live is not None and not live.closed and await live.responsive()
        uptime = int((time.monotonic() - live.started_mono) * 1000) if live is not None else 0
        detail = self.browsers.detail(row)
        return b.HealthReply(health=b.SessionHealth(
            status="healthy" if responsive and row["status"] == "running" else "unhealthy",
            sessionState=row["status"], browserResponsive=responsive, currentUrl=detail.currentUrl,
            uptimeMs=uptime))

    async def discovery(self, msg: b.GetDiscovery) -> b.DiscoveryReply:
        live = await self.browsers.running(msg.actor, msg.session_id, msg.token)
        try:
            targets = (await live.call("Target.getTargets", timeout_s=10)).get("targetInfos") or []
        except CdpError as exc:
            raise ServiceError(502, "browser_unresponsive", str(exc)) from None
        return b.DiscoveryReply(
            version=live.version,
            targets=[{"id": str(t.get("targetId")), "type": str(t.get("type")),
                      "title": str(t.get("title", "")),
                      "url": str(t.get("url", ""))} for t in targets if t.get("type") == "page"],
            cdp_token=self.browsers.tokens.mint(msg.session_id))

    async def cdp(self, msg: b.OpenCdp, stream: Any) -> None:
        live = await self.browsers.running(msg.actor, msg.session_id, msg.token)
        await stream.send(b.CdpReady(client_id=0))

        async def receive() -> bytes | None:
            try:
                data = await stream.receive()
            except trio.EndOfChannel:
                return None
            return data if isinstance(data, bytes) else None

        async def touch() -> None:
            await self.store.touch(msg.session_id)

        await self.store.touch(msg.session_id)
        try:
            await live.serve_client(receive, stream.send, msg.target_id, touch)
        except RelayError as exc:
            raise ServiceError(400, "bad_cdp_message", str(exc)) from None
        with contextlib.suppress(Exception):
            await stream.send_eof()


async def main(ctx: ServiceContext[BrowsersConfig], *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer the browser messages; end idle sessions; end every session on stop."""
    assert ctx.db is not None
    config = ctx.config
    store = BrowserStore(ctx.db)
    storage = storage_from_env(os.environ, Path(config.data_dir))
    leftovers = []
    for row in await store.live(config.host_id):  # their browsers died with the previous process
        await store.transition(row["id"], row["status"], "failed", error_code="service_restarted",
                               error_message="the browsers service restarted; the browser is gone")
        if row["provider"] == "vm":
            leftovers.append((row["team_id"], row["machine_id"]))
    async with trio.open_nursery() as nursery:
        if leftovers:  # their VMs go too (nobody can reach them any more)
            nursery.start_soon(VmProvider(ctx.bus).destroy_leftovers, leftovers)
        browsers = Browsers(config=config, store=store, storage=storage, nursery=nursery, bus=ctx.bus,
                            model=model_from_env(os.environ))
        BrowserHandlers(browsers).register(ctx)
        nursery.start_soon(browsers.serve_idle)
        if ctx.bus is not None:
            await nursery.start(browsers.vm.watch_capsules)
        ctx.health_details["host_provider"] = "on" if config.browser_host else "off"
        ctx.health_details["planner"] = "on" if browsers.model is not None else "off"
        task_status.started()
        try:
            await ctx.stopping.wait()
        finally:
            await browsers.stop_all()
            nursery.cancel_scope.cancel()


SPEC: ServiceSpec[BrowsersConfig] = ServiceSpec(
    name="browsers",
    config_cls=BrowsersConfig,
    main=main,
    schema="browsers",
    migrations="dovecote.services.browsers:migrations",
)
