"""Live desktop sessions: their providers, the readiness ladder, actions in order, teardown.

:class:`Desktops` owns every session this service runs. A session is one task
in the service's nursery (:meth:`Desktops._serve_xvfb`, or the qemu provider's
in :mod:`.qemu`) that starts the desktop, climbs the readiness ladder
(:class:`Ladder`, deciding with :func:`.readiness.plan`), holds the bridge
while the session lives and tears everything down when it is deleted, idle
for ``DOVECOTE_DESKTOP_IDLE_TIMEOUT_S`` or the service stops.

Actions of one session run one at a time, in arrival order (a FIFO
``trio.Lock`` per session); each is recorded with its receipt (the history
and the audit trail), and a receipt of an action naming a task becomes that
task's ``lastReceipt``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import re
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import msgspec
import trio

from dovecote.bus.messages import desktops as d
from dovecote.bus.messages.common import Principal
from dovecote.libs import sandbox
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.services.desktops import actions as A
from dovecote.services.desktops import xvfb
from dovecote.services.desktops.errors import (
    BridgeUnavailable,
    InvalidAction,
    SessionNotFound,
    SharedHostPathInvalid,
    TaskNotActionable,
    UnsupportedProvider,
)
from dovecote.services.desktops.readiness import FINAL, Probe, bridge_status_of, plan
from dovecote.services.desktops.store import DesktopStore
from dovecote.vmmgr.guest.client import open_agent
from dovecote.vmmgr.guest.errors import AgentConnectionLost, AgentError, AgentRequestError

log = get_logger("dovecote.desktops")

USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
MIN_SIZE, MAX_W, MAX_H = (320, 200), 3840, 2160
RUN_COMMAND_TIMEOUT_S = 120.0
REGRESSION_SIZE = (1024, 768)
"""The ``regression`` profile's fixed screen (the requested ``width`` x ``height`` is not used):
a lighter fixture, no window manager, whatever the provider."""
ACTION_TIMEOUT_S = 30.0


class Bridge(Protocol):
    """What a provider's bridge does for the actions (the guest agent, locally or in a VM)."""

    async def exec(self, cmd: str | list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   timeout: float = 30.0) -> tuple[str, str, int, bool]: ...  # noqa: ASYNC109

    async def read_file(self, path: str) -> bytes: ...

    async def write_file(self, path: str, data: bytes) -> None: ...

    async def screenshot(self) -> bytes: ...


class LiveSession:
    """One session this service runs."""

    def __init__(self, record: d.SessionRecord, team_id: str, runtime_dir: Path | None) -> None:
        self.record = record
        self.team_id = team_id
        self.runtime_dir = runtime_dir
        self.bridge: Bridge | None = None
        self.lock = trio.Lock()
        self.ladder_done = trio.Event()
        self.stop = trio.Event()
        self.stopped = trio.Event()
        self.capsule_id: str | None = None
        self.capsule_host: str | None = None
        self.browser = False
        self.isolation = ""
        self.pids: list[int] = []
        self.shared_host_path: str | None = None
        """The host directory shared at ``/shared/hostshare`` (checked by :meth:`Desktops.shared_path`)."""

    @property
    def id(self) -> str:
        return self.record.id


class Ladder:
    """Climbs a session's readiness ladder, one checked rung at a time, within a deadline."""

    def __init__(self, session: LiveSession, timeout_s: float,
                 save: Callable[[LiveSession], Awaitable[None]]) -> None:
        self.session = session
        self.timeout_s = timeout_s
        self.save = save
        self.started = trio.current_time()
        self.last_error = ""

    async def rung(self, check: Callable[[], Awaitable[bool]],
                   fatal: Callable[[], str | None] = lambda: None) -> bool:
        """Check the next rung until it passes (True) or the session fails (False)."""
        while True:
            state = self.session.record.readiness_state
            if state in FINAL:
                return state == "runtime_ready"
            elapsed = trio.current_time() - self.started
            passed = False
            with trio.move_on_after(max(0.2, min(5.0, self.timeout_s - elapsed))):
                try:
                    passed = await check()
                except (OSError, AgentError, ServiceError) as exc:
                    self.last_error = str(exc)
            probe = Probe(elapsed_s=trio.current_time() - self.started, timeout_s=self.timeout_s,
                          display=passed, listening=passed, attached=passed, healthy=passed,
                          fatal=fatal())
            step = plan(state, probe)
            if step.state != state:
                error = step.error
                if error and self.last_error:
                    error = f"{error}: {self.last_error}"
                await self.move(step.state, error)
                return step.state != "failed"
            await trio.sleep(0.1)

    async def move(self, state: d.ReadinessState, error: str | None = None) -> None:
        rec = self.session.record
        rec.readiness_state = state
        rec.bridge_status = bridge_status_of(state)
        rec.readiness_history = [*rec.readiness_history, {"state": state, "at": A.now_iso()}]
        if state == "runtime_ready":
            rec.state = "running"
        elif state == "failed":
            rec.state = "failed"
            rec.bridge_error = error or "the session failed"
        await self.save(self.session)
        if state in FINAL:
            self.session.ladder_done.set()


class DesktopSettings(msgspec.Struct, kw_only=True, frozen=True):
    """What :class:`Desktops` needs from the service's config."""

    host_id: str
    xvfb_enabled: bool
    xvfb_user: str
    xvfb_root: str
    share_root: str
    bridge_timeout_s: float
    qemu_bridge_timeout_s: float
    idle_timeout_s: float
    team_max_capsules: int
    qemu_template: str


class Desktops:
    """The sessions of this service, their providers and their actions."""

    def __init__(self, store: DesktopStore, settings: DesktopSettings, nursery: trio.Nursery,
                 bus: Any = None) -> None:
        self.store = store
        self.settings = settings
        self.nursery = nursery
        self.bus = bus
        self.live: dict[str, LiveSession] = {}
        self._xvfb_lib: Path | None = None
        self._xvfb_user: xvfb.SandboxUser | None = None
        self.qemu: Any = None  # the qemu provider (services/desktops/qemu.py), set by the service
        self.recording: Any = None  # review recording + live view of qemu sessions (recorder/sessions.py)

    # -- records -----------------------------------------------------------------------

    async def save(self, session: LiveSession) -> None:
        await self.store.save_session(session.record, capsule_id=session.capsule_id)

    async def lookup(self, actor: Principal, session_id: str) -> LiveSession:
        """The caller's team's live session (404 otherwise)."""
        session = self.live.get(session_id)
        if session is None or session.team_id != actor.team_id or session.stop.is_set():
            raise SessionNotFound()
        return session

    def unavailable(self, session: LiveSession) -> BridgeUnavailable:
        rec = session.record
        return BridgeUnavailable({
            "provider": rec.provider, "qemu_profile": rec.qemu_profile, "viewer_url": rec.viewer_url,
            "live_desktop_view": msgspec.to_builtins(rec.live_desktop_view),
            "review_recording": msgspec.to_builtins(rec.review_recording),
            "bridge_status": rec.bridge_status, "readiness_state": rec.readiness_state,
            "bridge_error": rec.bridge_error})

    def ready_bridge(self, session: LiveSession) -> Bridge:
        if session.bridge is None or session.record.readiness_state != "runtime_ready":
            raise self.unavailable(session)
        return session.bridge

    # -- create ------------------------------------------------------------------------

    def _check_body(self, body: d.CreateSessionBody) -> None:
        if body.provider not in d.PROVIDERS:
            raise UnsupportedProvider(f"unsupported provider {body.provider!r} "
                                      "(supported: qemu, xvfb)")
        if body.provider == "xvfb" and not self.settings.xvfb_enabled:
            raise UnsupportedProvider("the xvfb provider is off on this host "
                                      "(the operator enables it with DOVECOTE_DESKTOP_XVFB=true)")
        if not (MIN_SIZE[0] <= body.width <= MAX_W and MIN_SIZE[1] <= body.height <= MAX_H):
            raise ServiceError(400, "invalid_request",
                               f"width must be {MIN_SIZE[0]}..{MAX_W} and height {MIN_SIZE[1]}..{MAX_H}")
        if body.desktop_user is not None and not USER_RE.match(body.desktop_user):
            raise ServiceError(400, "invalid_request", "desktop_user must be a plain user name")
        for name, value in (("desktop_home", body.desktop_home),
                            ("desktop_runtime_dir", body.desktop_runtime_dir)):
            if value is not None and (not value.startswith("/") or "\0" in value or ".." in value
                                      or len(value) > 256 or value.rstrip("/") in ("", "/usr", "/etc")):
                raise ServiceError(400, "invalid_request", f"{name} must be an absolute path")
        if body.boot not in (None, "", "default", "no-bridge"):
            raise ServiceError(400, "invalid_request", "boot must be default or no-bridge")
        if body.display is not None and body.display not in (":0", "0"):
            raise ServiceError(400, "invalid_request", "display must be :0 (one display per session)")

    def shared_path(self, value: str | None) -> str | None:
        """The real directory under ``DOVECOTE_DESKTOP_SHARE_ROOT`` a request shares, or 400."""
        if value is None:
            return None
        root = self.settings.share_root
        if not root:
            raise SharedHostPathInvalid("shared_host_path is not allowed on this host "
                                        "(the operator sets DOVECOTE_DESKTOP_SHARE_ROOT)")
        real_root = os.path.realpath(root)
        candidate = value if os.path.isabs(value) else os.path.join(real_root, value)
        real = os.path.realpath(candidate)
        if "\0" in value or not (real == real_root or real.startswith(real_root + os.sep)) \
                or not os.path.isdir(real):
            raise SharedHostPathInvalid(
                f"shared_host_path must be an existing directory under {real_root}")
        return real

    async def check_caps(self, actor: Principal) -> None:
        """429 when the team's capsules and sessions already reach its capsule cap."""
        sessions = await self.store.count_live(actor.team_id, "xvfb")
        capsules = 0
        if self.bus is not None:
            from dovecote.bus.messages.capsules import ListCapsules

            with contextlib.suppress(Exception):  # vmmgr away: the sessions still count
                reply = await self.bus.request("vmmgr", ListCapsules(actor=actor), timeout=5)
                capsules = sum(1 for c in reply.capsules
                               if c.status not in ("stopped", "missing", "error"))
        if capsules + sessions + 1 > self.settings.team_max_capsules:
            raise ServiceError(429, "quota_capsules",
                               f"the team already runs {capsules} capsules and {sessions} desktop "
                               f"sessions (limit {self.settings.team_max_capsules}); delete one first")

    def new_record(self, session_id: str, body: d.CreateSessionBody, *, runtime_dir: str | None,
                   home: str, user: str, runtime: str) -> d.SessionRecord:
        qemu = body.provider == "qemu"
        if qemu:
            view = d.LiveDesktopView(
                mode="unavailable", status="unavailable", provider_surface="none",
                matches_action_plane=False,
                reason="the live desktop stream is not available yet; poll "
                       f"/api/sessions/{session_id}/screenshot")
        else:
            view = d.LiveDesktopView(
                mode="screenshot_poll", status="ready", provider_surface="guest_xvfb_screenshot",
                matches_action_plane=True, canonical_url=f"/api/sessions/{session_id}/screenshot",
                refresh_interval_ms=3000)
        review = d.ReviewRecordingSummary(
            mode="unavailable", status="unavailable", retention="ephemeral_until_export",
            reason="review recording is not available yet")
        width, height = REGRESSION_SIZE if body.qemu_profile == "regression" else (body.width, body.height)
        return d.SessionRecord(
            id=session_id, provider=body.provider, qemu_profile=body.qemu_profile if qemu else None,
            display=":0", width=width, height=height, state="starting",
            created_at=A.now_iso(), artifacts_dir=runtime_dir,
            capabilities=["screenshot", "input", "windows", "commands", "files"],
            browser_command=body.browser_command, desktop_user=user, desktop_home=home,
            desktop_runtime_dir=runtime, runtime_base_url=None, viewer_url=None,
            live_desktop_view=view, review_recording=review, bridge_status="viewer_only",
            readiness_state="booting", bridge_error=None,
            readiness_history=[{"state": "booting", "at": A.now_iso()}])

    async def create(self, actor: Principal, body: d.CreateSessionBody) -> LiveSession:
        self._check_body(body)
        shared = self.shared_path(body.shared_host_path)
        if body.provider == "xvfb":
            xvfb.check_tools()
            await self.check_caps(actor)
            return await self._create_xvfb(actor, body, shared)
        if self.qemu is None:
            raise ServiceError(503, "provider_unavailable", "the qemu provider is not available")
        return await self.qemu.create(self, actor, body, shared)

    async def _create_xvfb(self, actor: Principal, body: d.CreateSessionBody,
                           shared: str | None) -> LiveSession:
        if self._xvfb_lib is None:
            root = Path(self.settings.xvfb_root)
            await trio.Path(root / "sessions").mkdir(parents=True, exist_ok=True)
            for path in (root, root / "sessions"):
                path.chmod(0o755)
            self._xvfb_user = await trio.to_thread.run_sync(xvfb.ensure_user, self.settings.xvfb_user)
            self._xvfb_lib = await trio.to_thread.run_sync(xvfb.install_lib, root)
        assert self._xvfb_user is not None
        session_id = "desk-" + uuid.uuid4().hex[:16]
        user = body.desktop_user or "dove"
        home = body.desktop_home or f"/home/{user}"
        runtime = body.desktop_runtime_dir or f"/tmp/runtime-{user}"
        session_dir = Path(self.settings.xvfb_root) / "sessions" / session_id
        spec = xvfb.SandboxSpec(
            session_dir=session_dir, lib_dir=self._xvfb_lib, user=self._xvfb_user, desktop_user=user,
            desktop_home=home, desktop_runtime_dir=runtime, width=body.width, height=body.height,
            window_manager="none" if body.qemu_profile == "regression" else "openbox",
            bridge=body.boot != "no-bridge", shared_host_path=shared)
        if body.qemu_profile == "regression":
            spec = dataclasses.replace(spec, width=REGRESSION_SIZE[0], height=REGRESSION_SIZE[1])
        record = self.new_record(session_id, body, runtime_dir=str(session_dir), home=home, user=user,
                                 runtime=runtime)
        session = LiveSession(record, actor.team_id, session_dir)
        session.isolation = xvfb.ISOLATION
        await self.store.insert_session(record, team_id=actor.team_id, host_id=self.settings.host_id,
                                        runtime_dir=str(session_dir))
        self.live[session_id] = session
        await self.store.audit(team_id=actor.team_id, actor=actor, event="session.create",
                               session_id=session_id, detail={"provider": "xvfb"})
        await self.nursery.start(self._serve_xvfb, session, spec)
        with trio.move_on_after(self.settings.bridge_timeout_s + 10):
            await session.ladder_done.wait()
        return session

    async def _serve_xvfb(self, session: LiveSession, spec: xvfb.SandboxSpec, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ladder = Ladder(session, self.settings.bridge_timeout_s, self.save)
        try:
            await trio.to_thread.run_sync(xvfb.prepare, spec)
            logfile = await trio.to_thread.run_sync(open, spec.session_dir / "sandbox.log", "wb")
            # The stack (the agent's connection) nests inside the nursery: it closes first.
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                stack.callback(logfile.close)
                proc = await nursery.start(_run_quietly, xvfb.argv(spec), logfile)
                session.pids = [proc.pid]
                task_status.started()
                bridge_dir = trio.Path(spec.bridge_dir)

                def fatal() -> str | None:
                    marker = spec.bridge_dir / "fatal"
                    if marker.exists():
                        return marker.read_text().strip() or "the sandbox failed"
                    if proc.returncode is not None:
                        return f"the sandbox exited with status {proc.returncode}"
                    return None

                async def display() -> bool:
                    return await (bridge_dir / "display.ready").exists()

                async def listening() -> bool:
                    return await (bridge_dir / "agent.sock").exists()

                agent_box: list[Any] = []
                socket_path = str(spec.bridge_dir / "agent.sock")

                async def attach() -> bool:
                    async with open_agent(socket_path, connect_timeout=3.0):
                        return True

                async def healthy() -> bool:
                    if not agent_box:  # held for the session's life, outside the ladder's scopes
                        return False
                    bridge = xvfb.XvfbBridge(agent_box[0], spec)
                    _, _, code, _ = await bridge.exec("xdpyinfo >/dev/null && xdotool getmouselocation",
                                                        timeout=10)
                    if code == 0:
                        session.bridge = bridge
                    return code == 0

                for check in (display, listening, attach, healthy):
                    if check is healthy and not agent_box:
                        with contextlib.suppress(AgentError):  # bounded by its connect timeout
                            agent_box.append(await stack.enter_async_context(
                                open_agent(socket_path, connect_timeout=8.0)))
                    if not await ladder.rung(check, fatal):
                        break
                await session.stop.wait()
                nursery.cancel_scope.cancel()
        except Exception as exc:
            log.warning("xvfb session failed", exc_info=True, extra={"session_id": session.id})
            if session.record.readiness_state not in FINAL:
                with contextlib.suppress(Exception):
                    await ladder.move("failed", f"the sandbox could not start: {exc}")
        finally:
            session.bridge = None
            session.ladder_done.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(
                    lambda: shutil.rmtree(spec.session_dir, ignore_errors=True))
            session.stopped.set()

    # -- delete and idle -----------------------------------------------------------------

    async def delete(self, actor: Principal, session_id: str) -> None:
        session = await self.lookup(actor, session_id)
        await self.store.audit(team_id=actor.team_id, actor=actor, event="session.delete",
                               session_id=session_id)
        await self.teardown(session)

    async def teardown(self, session: LiveSession) -> None:
        """Stop the desktop, delete its runtime storage, mark the record ``stopped``."""
        if self.recording is not None and session.record.provider == "qemu":
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await self.recording.flushed(session)  # the last actions' screens, while the VM runs
        session.stop.set()
        with trio.move_on_after(60):
            await session.stopped.wait()
        if self.recording is not None and session.record.provider == "qemu":
            with trio.CancelScope(shield=True), trio.move_on_after(20):
                await self.recording.closed(session)  # evidence goes unless exported or pinned
        session.record.state = "stopped"
        with trio.CancelScope(shield=True):
            await self.save(session)
        self.live.pop(session.id, None)

    async def serve_idle_timeout(self, every_s: float = 30.0) -> None:
        while True:
            await trio.sleep(min(every_s, self.settings.idle_timeout_s))
            try:
                for session_id in await self.store.idle_sessions(self.settings.host_id,
                                                                 self.settings.idle_timeout_s):
                    session = self.live.get(session_id)
                    if session is not None:
                        log.info("desktop session idle; stopping it", extra={"session_id": session_id})
                        await self.teardown(session)
            except Exception:
                log.warning("idle sweep failed", exc_info=True)

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            for session in list(self.live.values()):
                await self.teardown(session)

    # -- actions ---------------------------------------------------------------------------

    async def run_action(self, actor: Principal, session_id: str, action: d.ActionBase) -> d.ActionReceipt:
        session = await self.lookup(actor, session_id)
        task_id = action.task()
        if task_id is not None:
            task = await self.store.task(actor.team_id, task_id)
            if task is None or task.sessionId != session_id:
                raise InvalidAction(f"task {task_id} does not exist or belongs to another session")
            if task.status in ("paused", "terminated", "completed"):
                raise TaskNotActionable(task_id, task.status)
        A.check(action, session.record.width, session.record.height)
        recorded = self.recording is not None and session.record.provider == "qemu"
        async with session.lock:  # one at a time, in arrival order
            bridge = self.ready_bridge(session)
            if recorded:  # the recorder's screenshot of the last action's screen comes first
                await self.recording.screen_taken(session)
            started = A.now_iso()
            try:
                result, error = await self._perform(session, bridge, action)
            except AgentConnectionLost as exc:
                session.bridge = None
                session.record.readiness_state, session.record.bridge_status = "failed", "failed"
                session.record.state = "failed"
                session.record.bridge_error = f"the bridge connection was lost: {exc}"
                await self.save(session)
                raise self.unavailable(session) from None
            receipt = A.receipt(action, started, result=result, error=error)
            if recorded:  # the screen it left and the timeline entry, after the receipt, in order
                await self.recording.queue_action(session, actor, action, receipt)
        doc = d.action_dict(action)
        await self.store.record_action(session_id=session_id, team_id=actor.team_id, actor=actor,
                                       action=doc, receipt=receipt, task_id=task_id)  # and touches
        if task_id is not None:
            await self.store.task_receipt(task_id, receipt)
        return receipt

    def _user(self, session: LiveSession, run_as: str | None) -> str | None:
        desktop = session.record.desktop_user
        if run_as in (None, "", "desktop", desktop):
            return desktop
        return run_as

    async def _perform(self, session: LiveSession, bridge: Bridge, action: d.ActionBase
                       ) -> tuple[dict[str, Any], d.StructuredError | None]:
        kind = str(type(action).__struct_config__.tag)
        command = A.command_for(action)
        if command is not None:
            out, err, code, timed_out = await bridge.exec(command.argv, timeout=ACTION_TIMEOUT_S)
            if code != 0:
                return {}, A.exec_error(command.tool, code, out, err, timed_out=timed_out)
            return command.result, None
        match action:
            case d.OpenApp(name=name, run_as_user=run_as):
                program = A.app_command(name)
                user = self._user(session, run_as)
                if session.record.provider == "xvfb" and user != session.record.desktop_user:
                    return {}, A.unsupported(kind, "the xvfb sandbox has only the desktop user")
                out, err, code, _ = await bridge.exec(A.launch_script(program), user=user, timeout=15)
                if code != 0:
                    return {}, A.exec_error(program, code, out, err)
                return {"command": program}, None
            case d.RunCommand(command=cmd, cwd=cwd, env=env, run_as_user=run_as):
                user = self._user(session, run_as)
                if session.record.provider == "xvfb" and user != session.record.desktop_user:
                    return {}, A.unsupported(kind, "the xvfb sandbox has only the desktop user")
                try:
                    out, err, code, timed_out = await bridge.exec(
                        cmd, env=env, cwd=cwd, user=user, timeout=RUN_COMMAND_TIMEOUT_S)
                except AgentRequestError as exc:  # a cwd that does not exist, an unknown user
                    return {}, A.io_error(str(exc), cwd or "")
                if code != 0:
                    return {}, A.exec_error("the command", code, out, err, timed_out=timed_out)
                return {"stdout": out, "stderr": err, "exit_code": code}, None
            case d.ReadFileAction(path=path):
                try:
                    data = await bridge.read_file(self._path(session, path))
                except (AgentRequestError, OSError) as exc:
                    return {}, A.io_error(f"cannot read {path}: {exc}", path)
                return {"path": path, "contents": data.decode("utf-8", errors="replace")}, None
            case d.WriteFileAction(path=path, contents=contents):
                data = contents.encode()
                try:
                    await bridge.write_file(self._path(session, path), data)
                except (AgentRequestError, OSError) as exc:
                    return {}, A.io_error(f"cannot write {path}: {exc}", path)
                return {"path": path, "bytes_written": len(data)}, None
        return {}, A.unsupported(kind, "this session has no browser adapter (no DevTools endpoint)")

    @staticmethod
    def _path(session: LiveSession, path: str) -> str:
        home = session.record.desktop_home or "/"
        return path if path.startswith("/") else os.path.join(home, path)

    # -- observation -------------------------------------------------------------------------

    async def screenshot(self, actor: Principal, session_id: str) -> bytes:
        session = await self.lookup(actor, session_id)
        if session.bridge is None and self.qemu is not None and session.record.provider == "qemu":
            return bytes(await self.qemu.screenshot(self, session, actor))
        bridge = self.ready_bridge(session)
        async with session.lock:
            try:
                return await bridge.screenshot()
            except (OSError, AgentError) as exc:
                raise ServiceError(503, "screenshot_failed", f"could not take a screenshot: {exc}") from None

    async def observe(self, actor: Principal, session_id: str) -> d.Observation:
        session = await self.lookup(actor, session_id)
        bridge = self.ready_bridge(session)
        png = await self.screenshot(actor, session_id)
        async with session.lock:
            out, _, _, _ = await bridge.exec(["sh", "-c", A.PROBE_SCRIPT], timeout=10)
        window, cursor = A.parse_probe(out)
        width, height = png_size(png)
        history = await self.store.history(session_id)
        summary = (f"{session.record.provider} desktop {width}x{height}; active window: "
                   + (f"{window.title!r} ({window.class_name})" if window else "none")
                   + (f"; pointer at {cursor.x},{cursor.y}" if cursor else ""))
        return d.Observation(
            captured_at=A.now_iso(),
            screenshot=d.ScreenshotInfo(mime_type="image/png", data_base64=base64.b64encode(png).decode(),
                                        width=width, height=height),
            active_window=window, cursor_position=cursor,
            capability_flags=list(session.record.capabilities), browser=None,
            raw={"probe": out, "provider": session.record.provider,
                 "readiness_state": session.record.readiness_state},
            summary=summary, screenshot_url=f"/api/sessions/{session_id}/screenshot",
            action_history=history)

    def session_capabilities(self, session: LiveSession | None) -> d.Capabilities:
        if session is None:
            return d.Capabilities(
                actions=A.capabilities(browser=False), provider="qemu", browser_mode="unavailable",
                vm_mode="qemu_microvm", enrichments=["observation", "screenshot", "tasks"],
                isolation="vm (qemu provider); " + (xvfb.ISOLATION if self.settings.xvfb_enabled
                                                    else "the xvfb provider is off"))
        ready = session.bridge is not None and session.record.readiness_state == "runtime_ready"
        return d.Capabilities(
            actions=A.capabilities(browser=session.browser) if ready else [],
            provider=session.record.provider,
            browser_mode="cdp" if session.browser else "unavailable",
            vm_mode="qemu_microvm" if session.record.provider == "qemu" else "none",
            enrichments=["observation", "screenshot", "tasks"] if ready else [],
            isolation=session.isolation)


async def _run_quietly(argv: list[str], logfile: Any, *,
                       task_status: trio.TaskStatus[sandbox.SandboxProcess] = trio.TASK_STATUS_IGNORED
                       ) -> None:
    """Run the session's sandbox until it exits; killed (and reaped) when cancelled.

    Forked by the sandbox's spawner thread (:func:`sandbox.open_process`), not by a Trio
    worker thread: bwrap's ``--die-with-parent`` follows the thread that forked it, and a
    Trio worker exits after 10 s without a job, which would kill the desktop with it.
    """
    proc = await sandbox.open_process(argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile)
    try:
        task_status.started(proc)
        await proc.wait()
    finally:
        await proc.aclose()


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    if len(png) < 24 or png[:8] != b"\x89PNG\r\n\x1a\n":
        return 0, 0
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
