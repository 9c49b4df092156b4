"""The desktops service: desktop sessions an agent can drive, and their tasks.

This is the service's process entry: ``dovecote desktops`` runs :data:`SPEC`.
It answers the :data:`~dovecote.bus.messages.desktops.DesktopRequest` family
for the gateway's ``/api/sessions*``, ``/api/tasks*``, ``/api/dashboard``,
``/api/health`` and ``/api/capabilities`` routes. Sessions live in
:mod:`.sessions`; tasks are rows (:mod:`.store`) moved by their verbs here.

Providers: ``qemu`` (the default: a capsule of the desktop template, driven
through vmmgr, :mod:`.qemu`) and ``xvfb`` (the operator's explicit fallback,
``DOVECOTE_DESKTOP_XVFB=true``, :mod:`.xvfb`). At start, sessions the previous
process left (a crash) are marked ``stopped`` and their runtime storage
removed: their sandboxes died with it.
"""

from __future__ import annotations

import shutil
import uuid
from typing import Annotated

import msgspec
import trio

from dovecote.bus.messages import desktops as d
from dovecote.libs.config import BaseConfig
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.runtime import ServiceContext, ServiceSpec
from dovecote.services.desktops import xvfb
from dovecote.services.desktops.actions import now_iso
from dovecote.services.desktops.errors import InvalidTaskTransition, SessionNotFound, TaskNotFound
from dovecote.services.desktops.sessions import Desktops, DesktopSettings
from dovecote.services.desktops.store import DesktopStore

log = get_logger("dovecote.desktops")

Seconds = Annotated[float, msgspec.Meta(gt=0)]

TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "pause": (("pending", "running"), "paused"),
    "resume": (("paused",), "running"),
    "terminate": (("pending", "running", "paused"), "terminated"),
    "complete": (("pending", "running", "paused"), "completed"),
    "reset": (("pending", "running", "paused", "terminated", "completed"), "pending"),
}
"""verb -> (the statuses it applies to, the status it sets)."""


class DesktopsConfig(BaseConfig, kw_only=True):
    """Settings of the desktops service (``DOVECOTE_*`` variables)."""

    desktop_xvfb: bool = False
    """Enable the xvfb provider (weaker isolation: a sandbox on the host kernel)."""
    desktop_xvfb_user: str = "dovecote-desktop"
    desktop_xvfb_root: str = "/var/tmp/dovecote/desktops"
    """Runtime directories of xvfb sessions (readable by the sandbox user: not under a 0700 dir)."""
    desktop_share_root: str = ""
    """The only directory tree ``shared_host_path`` may name (empty: sharing is refused)."""
    desktop_bridge_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 45.0
    """How long an xvfb session may take to become ``runtime_ready`` before it is ``failed``."""
    desktop_qemu_bridge_timeout_s: Seconds = 300.0
    """How long a qemu session may take from its capsule's creation to ``runtime_ready``
    (a template restore takes well under a minute under TCG) before it is ``failed``."""
    desktop_idle_timeout_s: Seconds = 1800.0
    team_max_capsules: Annotated[int, msgspec.Meta(ge=1)] = 10
    """The team capsule cap vmmgr enforces (the same variable); xvfb sessions count against it."""


class DesktopHandlers:
    """The bus handlers of the desktops service."""

    def __init__(self, desktops: Desktops, store: DesktopStore) -> None:
        self.desktops = desktops
        self.store = store

    def register(self, handle: object) -> None:
        for message, handler in (
                (d.CreateSession, self.create), (d.ListSessions, self.list), (d.GetSession, self.get),
                (d.DeleteSession, self.delete), (d.RunAction, self.action),
                (d.GetObservation, self.observe), (d.GetScreenshot, self.screenshot),
                (d.GetCapabilities, self.capabilities), (d.CreateTask, self.create_task),
                (d.GetTask, self.get_task), (d.ChangeTask, self.change_task),
                (d.GetDashboard, self.dashboard), (d.GetHealth, self.health)):
            handle(message, handler)  # type: ignore[operator]

    async def create(self, msg: d.CreateSession) -> d.SessionReply:
        session = await self.desktops.create(msg.actor, msg.body)
        return d.SessionReply(session=session.record, browser_adapter=session.browser)

    async def list(self, msg: d.ListSessions) -> d.SessionList:
        return d.SessionList(sessions=await self.store.sessions(msg.actor.team_id))

    async def get(self, msg: d.GetSession) -> d.SessionReply:
        session = await self.desktops.lookup(msg.actor, msg.session_id)
        if self.desktops.recording is not None and session.record.provider == "qemu":
            await self.desktops.recording.refresh(session, msg.actor)
        return d.SessionReply(session=session.record, browser_adapter=session.browser)

    async def delete(self, msg: d.DeleteSession) -> d.DesktopDone:
        await self.desktops.delete(msg.actor, msg.session_id)
        return d.DesktopDone()

    async def action(self, msg: d.RunAction) -> d.ReceiptReply:
        return d.ReceiptReply(receipt=await self.desktops.run_action(msg.actor, msg.session_id, msg.action))

    async def observe(self, msg: d.GetObservation) -> d.ObservationReply:
        return d.ObservationReply(observation=await self.desktops.observe(msg.actor, msg.session_id))

    async def screenshot(self, msg: d.GetScreenshot) -> d.ScreenshotReply:
        return d.ScreenshotReply(png=await self.desktops.screenshot(msg.actor, msg.session_id))

    async def capabilities(self, msg: d.GetCapabilities) -> d.CapabilitiesReply:
        session = await self.desktops.lookup(msg.actor, msg.session_id) if msg.session_id else None
        return d.CapabilitiesReply(capabilities=self.desktops.session_capabilities(session))

    async def create_task(self, msg: d.CreateTask) -> d.TaskReply:
        body = msg.body
        if not body.description.strip() or len(body.description) > 10_000:
            raise ServiceError(400, "invalid_request", "description must be 1 to 10000 characters")
        try:
            await self.desktops.lookup(msg.actor, body.session_id)
        except SessionNotFound:
            raise SessionNotFound() from None
        task = await self.store.insert_task(task_id="task-" + uuid.uuid4().hex[:16],
                                            team_id=msg.actor.team_id, body=body)
        await self.store.audit(team_id=msg.actor.team_id, actor=msg.actor, event="task.create",
                               session_id=body.session_id, task_id=task.id)
        return d.TaskReply(task=task)

    async def get_task(self, msg: d.GetTask) -> d.TaskReply:
        task = await self.store.task(msg.actor.team_id, msg.task_id)
        if task is None:
            raise TaskNotFound()
        return d.TaskReply(task=task)

    async def change_task(self, msg: d.ChangeTask) -> d.TaskReply:
        task = await self.store.task(msg.actor.team_id, msg.task_id)
        if task is None:
            raise TaskNotFound()
        sources, target = TRANSITIONS[msg.verb]
        if task.status not in sources:
            raise InvalidTaskTransition(f"cannot {msg.verb} a task that is {task.status}")
        changed = await self.store.set_task_status(task.id, task.status, target,
                                                   clear_receipt=msg.verb == "reset")
        if changed is None:
            raise InvalidTaskTransition(f"task {task.id} changed meanwhile; read it again")
        await self.store.audit(team_id=msg.actor.team_id, actor=msg.actor, event=f"task.{msg.verb}",
                               session_id=task.sessionId, task_id=task.id)
        return d.TaskReply(task=changed)

    async def dashboard(self, msg: d.GetDashboard) -> d.DashboardReply:
        tasks = await self.store.tasks(msg.actor.team_id)
        history = {}
        for record in await self.store.sessions(msg.actor.team_id):
            history[record.id] = await self.store.history(record.id)
        return d.DashboardReply(tasks=tasks, action_history=history)

    async def health(self, msg: d.GetHealth) -> d.HealthReply:
        return d.HealthReply(health=await health_of(self.desktops, self.store, msg.actor.team_id))


async def health_of(desktops: Desktops, store: DesktopStore, team_id: str) -> d.DesktopHealth:
    """Control-plane plus guest-runtime health, and the team's session count."""
    settings = desktops.settings
    missing = xvfb.missing_tools()
    providers = {
        "xvfb": d.ProviderHealth(
            enabled=settings.xvfb_enabled,
            status=("ok" if not missing else "missing_tool") if settings.xvfb_enabled else "disabled",
            isolation=xvfb.ISOLATION,
            reason=(f"missing {', '.join(missing)}" if missing and settings.xvfb_enabled else
                    None if settings.xvfb_enabled else "off (DOVECOTE_DESKTOP_XVFB=true enables it)")),
    }
    if desktops.qemu is not None:
        providers["qemu"] = await desktops.qemu.health(desktops)
    else:
        providers["qemu"] = d.ProviderHealth(enabled=False, status="unavailable", isolation="vm",
                                             reason="the qemu provider is not loaded")
    usable = any(p.status == "ok" for p in providers.values())
    count = await store.count_live(team_id)
    return d.DesktopHealth(ok=True, guest=d.GuestHealth(status="ok" if usable else "degraded",
                                                 session_count=count, runtime_base_url=None),
                    now=now_iso(), providers=providers)


async def main(ctx: ServiceContext[DesktopsConfig], *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer the desktop messages; stop idle sessions; tear every session down on stop."""
    assert ctx.db is not None
    config = ctx.config
    store = DesktopStore(ctx.db)
    settings = DesktopSettings(
        host_id=config.host_id, xvfb_enabled=config.desktop_xvfb, xvfb_user=config.desktop_xvfb_user,
        xvfb_root=config.desktop_xvfb_root, share_root=config.desktop_share_root,
        bridge_timeout_s=config.desktop_bridge_timeout_s,
        qemu_bridge_timeout_s=config.desktop_qemu_bridge_timeout_s,
        idle_timeout_s=config.desktop_idle_timeout_s, team_max_capsules=config.team_max_capsules,
        qemu_template="desktop")
    leftovers = await _forget_leftovers(store, config.host_id)
    async with trio.open_nursery() as nursery:
        desktops = Desktops(store, settings, nursery, ctx.bus)
        from dovecote.services.desktops.qemu import QemuProvider

        desktops.qemu = QemuProvider(ctx.bus)
        nursery.start_soon(desktops.qemu.destroy_leftovers, leftovers)
        from dovecote.recorder.sessions import SessionRecording

        desktops.recording = SessionRecording(ctx.bus, nursery)
        DesktopHandlers(desktops, store).register(ctx.handle)
        nursery.start_soon(desktops.serve_idle_timeout)
        ctx.health_details["xvfb"] = "on" if config.desktop_xvfb else "off"
        task_status.started()
        try:
            await ctx.stopping.wait()
        finally:
            await desktops.stop_all()
            nursery.cancel_scope.cancel()


async def _forget_leftovers(store: DesktopStore, host_id: str) -> list[tuple[str, str]]:
    """Sessions of a previous run are stopped; returns their capsules (team, capsule id),
    which the qemu provider destroys once vmmgr answers."""
    capsules = []
    for row in await store.live_sessions(host_id):
        if row["provider"] == "qemu" and row.get("capsule_id"):
            capsules.append((str(row["team_id"]), str(row["capsule_id"])))
        record = msgspec.convert(row["record"], d.SessionRecord)
        record.state = "stopped"
        await store.save_session(record)
        if row["provider"] == "xvfb" and row["runtime_dir"]:
            await trio.to_thread.run_sync(_remove, str(row["runtime_dir"]))
        log.info("a session of a previous run is gone", extra={"session_id": row["id"]})
    return capsules


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


SPEC: ServiceSpec[DesktopsConfig] = ServiceSpec(
    name="desktops",
    config_cls=DesktopsConfig,
    main=main,
    schema="desktops",
    migrations="dovecote.services.desktops:migrations",
)
