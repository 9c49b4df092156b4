"""Live sessions: a desktop kept for a person who sends instructions one at a time.

A session is created ``observing`` while its desktop session starts, then
``idle``. ``commands`` takes one instruction (409 while one runs or a
confirmation is pending, 400 without ``instruction``), routes it (an
``agent_route`` event: ``cli`` for ``$ command``, else ``planner`` when a
model is configured, else ``desktop``, which types the text) and runs it as a
task under its own cancel scope (status ``acting``). The planner's
``ask_confirmation`` (and any action the policy marks sensitive) sets
``pendingConfirmation`` and status ``waiting_confirmation`` until ``confirm``.
``stop`` cancels the running instruction. Screen frames are JPEG re-encodings
of the desktop's PNG screenshot (PyAV).
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import msgspec
import trio

from dovecote.bus.messages import desktops as d
from dovecote.bus.messages import runs as r
from dovecote.bus.messages.common import Principal
from dovecote.libs.errors import DovecoteError
from dovecote.libs.logs import get_logger
from dovecote.libs.planner import PlannerError
from dovecote.services.runs.agent import DesktopTools, Refused, StepFailed
from dovecote.services.runs.desk import Desk, DeskError, Events, png_size
from dovecote.services.runs.planning import make_planner, memory_for, mentioned_apps
from dovecote.services.runs.runs import RunSettings, now_iso
from dovecote.services.runs.scenarios import wire_error
from dovecote.services.runs.store import RunStore

log = get_logger("dovecote.runs.live")


def png_to_jpeg(png: bytes) -> tuple[bytes, int, int]:
    import av

    decoder = av.CodecContext.create("png", "r")
    frames = decoder.decode(av.Packet(png))
    if not frames:
        raise ValueError("not a PNG")
    frame = frames[0].reformat(format="yuvj420p")
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height = frame.width, frame.height
    encoder.pix_fmt = "yuvj420p"
    encoder.time_base = Fraction(1, 2)
    packets = list(encoder.encode(frame)) + list(encoder.encode(None))
    return bytes(packets[0]), frame.width, frame.height


@dataclass(kw_only=True)
class Live:
    record: r.LiveSession
    actor: Principal
    desk: Desk
    ready: trio.Event = field(default_factory=trio.Event)
    confirmed: trio.Event | None = None
    busy: bool = False
    scope: trio.CancelScope | None = None


class LiveSessions:
    def __init__(
        self, *, store: RunStore, events: Events, bus: Any, nursery: trio.Nursery, settings: RunSettings
    ) -> None:
        self.store = store
        self.events = events
        self.bus = bus
        self.nursery = nursery
        self.settings = settings
        self.sessions: dict[str, Live] = {}
        self.active: dict[str, trio.CancelScope] = {}

    async def end_leftovers(self) -> None:
        return None

    async def lookup(self, actor: Principal, session_id: str) -> r.LiveSession:
        record = await self.store.live(actor.team_id, session_id)
        if record is None:
            raise wire_error(404, "Live session not found.", "not_found")
        return record

    def _live(self, actor: Principal, session_id: str) -> Live:
        live = self.sessions.get(session_id)
        if live is None or live.actor.team_id != actor.team_id:
            raise wire_error(404, "Live session not found.", "not_found")
        return live

    async def _save(self, live: Live, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(live.record, key, value)
        live.record.updatedAt = now_iso()
        with trio.CancelScope(shield=True):
            await self.store.save_live(live.record)

    async def create(self, msg: r.CreateLive) -> r.LiveReply:
        body = msg.body
        at = now_iso()
        agent = body.agentType or ("planner" if self.settings.model is not None else "desktop")
        record = r.LiveSession(
            id="live-" + uuid.uuid4().hex[:16],
            createdAt=at,
            updatedAt=at,
            model=body.model or (self.settings.model.model if self.settings.model else None),
            authProvider=body.authProvider,
            agentType=agent,
            agentConfig=body.agentConfig,
            status="observing",
            artifactDir=None,
            latestScreenshotUrl=None,
            latestInstruction=None,
            latestSummary=None,
            stopRequested=False,
            error=None,
            pendingConfirmation=None,
        )
        await self.store.insert_live(record, msg.actor.team_id, msg.actor)
        emit = self.events.emitter(record.id, "live", msg.actor.team_id)
        live = Live(
            record=record, actor=msg.actor, desk=Desk(self.bus, msg.actor, self.store, record.id, emit)
        )
        self.sessions[record.id] = live
        self.nursery.start_soon(self._hold, live)
        return r.LiveReply(session=record)

    async def _hold(self, live: Live) -> None:
        """Start the session's desktop, then keep it until the service stops."""
        scope = trio.CancelScope()
        self.active[live.record.id] = scope
        try:
            with scope:
                try:
                    session = await live.desk.create(
                        1024, 768, self.settings.provider, self.settings.ready_timeout_s
                    )
                    await self._save(live, status="idle", machineId=session.id)
                    await live.desk.emit("status", "idle", {"status": "idle", "machineId": session.id})
                    live.ready.set()
                except (DeskError, DovecoteError, trio.TooSlowError) as exc:
                    await self._save(live, status="error", error=str(exc) or type(exc).__name__)
                    await live.desk.emit("error", str(exc), level="error")
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(90):
                await live.desk.delete()
                self.active.pop(live.record.id, None)

    async def list_sessions(self, msg: r.ListLive) -> r.LiveList:
        return r.LiveList(sessions=await self.store.lives(msg.actor.team_id))

    async def get(self, msg: r.GetLive) -> r.LiveDetail:
        record = await self.lookup(msg.actor, msg.session_id)
        return r.LiveDetail(session=record, events=await self.store.events(msg.actor.team_id, record.id))

    def _ready(self, live: Live) -> None:
        if not live.ready.is_set():
            raise wire_error(409, "The machine is not ready yet.", "not_ready")

    async def observe(self, msg: r.ObserveLive) -> r.ObserveReply:
        live = self._live(msg.actor, msg.session_id)
        self._ready(live)
        observation = await live.desk.observe()
        png = base64.b64decode(observation.screenshot.data_base64)
        width, height = png_size(png)
        url = f"/api/live-sessions/{live.record.id}/screen-stream"
        if not live.busy:
            await self._save(live, status="idle", latestScreenshotUrl=url)
        windows = [msgspec.to_builtins(observation.active_window)] if observation.active_window else []
        return r.ObserveReply(
            session=live.record,
            heartbeat={"at": observation.captured_at, "machineId": live.desk.session_id, "alive": True},
            windows=windows,
            screenshot={"url": url, "width": width, "height": height},
        )

    async def frame(self, msg: r.GetFrame) -> r.FrameReply:
        live = self._live(msg.actor, msg.session_id)
        self._ready(live)
        png = await live.desk.screenshot_png()
        jpeg, width, height = await trio.to_thread.run_sync(png_to_jpeg, png)
        return r.FrameReply(timestamp=_now_ms(), width=width, height=height, jpeg=jpeg)

    async def command(self, msg: r.LiveCommand) -> r.LiveReply:
        instruction = (msg.body.instruction or "").strip()
        if not instruction:
            raise wire_error(400, "instruction is required")
        live = self._live(msg.actor, msg.session_id)
        if live.record.pendingConfirmation is not None:
            raise wire_error(409, "The session is waiting for a confirmation.", "conflict")
        if live.busy:
            raise wire_error(409, "Another instruction is already executing.", "conflict")
        self._ready(live)
        live.busy = True
        await self._save(
            live, status="acting", latestInstruction=instruction, stopRequested=False, error=None
        )
        await live.desk.emit("message", instruction, {"role": "user"})
        self.nursery.start_soon(self._instruct, live, instruction, msg.body.model, msg.body.authProvider)
        return r.LiveReply(session=live.record)

    async def _instruct(
        self, live: Live, instruction: str, model: str | None, auth_provider: str | None = None
    ) -> None:
        live.scope = trio.CancelScope()
        emit = live.desk.emit
        try:
            with live.scope:
                try:
                    route = (
                        "cli"
                        if instruction.startswith("$")
                        else "planner"
                        if self.settings.model is not None and live.record.agentType != "desktop"
                        else "desktop"
                    )
                    await emit(
                        "agent_route",
                        f"routed to {route}",
                        {
                            "agentType": route,
                            "classifiedRoute": route,
                            "driverId": {
                                "cli": "run-command",
                                "planner": "openai-compatible",
                                "desktop": "type-text",
                            }[route],
                            "driverLabel": (
                                self.settings.model.model
                                if route == "planner" and self.settings.model
                                else route
                            ),
                        },
                    )
                    if route == "cli":
                        receipt = await live.desk.act(d.RunCommand(command=instruction[1:].strip()))
                        summary = (
                            str(receipt.result.get("stdout", ""))[:2000]
                            if receipt.status == "ok"
                            else f"error: {receipt.error.message if receipt.error else ''}"
                        )
                    elif route == "desktop":
                        await live.desk.act(d.TypeText(text=instruction))
                        summary = "typed the instruction"
                    else:
                        assert self.settings.model is not None
                        team = live.actor.team_id
                        apps = {e.appContext or "" for e in await self.store.memory(team, scope="app")}
                        memory = await memory_for(self.store, team, mentioned_apps(apps, instruction))
                        planner = make_planner(
                            self.settings.model,
                            model=model or live.record.model,
                            auth_provider=auth_provider or live.record.authProvider,
                            team_id=team,
                            codex=self.settings.codex,
                            memory=memory,
                        )
                        policy = dict(live.record.agentConfig.get("policy") or {})
                        tools = DesktopTools(live.desk, policy, lambda m, o: self._ask(live, m, o))
                        async with trio.open_nursery() as shots:
                            live.desk.background = shots
                            try:
                                result = await planner.run(instruction, tools)
                            finally:
                                live.desk.background = None
                        summary = result.summary
                    await emit("message", summary, {"role": "assistant"})
                    await self._save(live, status="idle", latestSummary=summary)
                except (PlannerError, DovecoteError, Refused, StepFailed, ValueError) as exc:
                    await emit("error", str(exc), level="error")
                    await self._save(live, status="error", error=str(exc))
            if live.scope.cancelled_caught:
                await emit("status", "stopped", {"status": "idle", "stopped": True})
                await self._save(live, status="idle", pendingConfirmation=None, latestSummary="stopped")
        finally:
            live.busy = False
            live.scope = None

    async def _ask(self, live: Live, message: str, options: list[str]) -> str:
        event = trio.Event()
        live.confirmed = event
        await self._save(
            live,
            status="waiting_confirmation",
            pendingConfirmation=r.PendingConfirmation(
                message=message, options=options, resolveWith=None, requestedAt=now_iso()
            ),
        )
        await live.desk.emit(
            "status",
            "waiting_confirmation",
            {"status": "waiting_confirmation", "message": message, "options": options},
        )
        await event.wait()
        pending = live.record.pendingConfirmation
        choice = pending.resolveWith if pending and pending.resolveWith else "confirmed"
        await self._save(live, status="acting", pendingConfirmation=None)
        return choice

    async def confirm(self, msg: r.ConfirmLive) -> r.LiveReply:
        live = self._live(msg.actor, msg.session_id)
        pending = live.record.pendingConfirmation
        if pending is None or live.confirmed is None:
            raise wire_error(400, "No pending confirmation.")
        if pending.options and msg.body.choice not in pending.options:
            raise wire_error(400, f"choice must be one of {pending.options}")
        pending.resolveWith = msg.body.choice
        await live.desk.emit("message", f"confirmation: {msg.body.choice}", {"choice": msg.body.choice})
        live.confirmed.set()
        live.confirmed = None
        return r.LiveReply(session=live.record)

    async def stop(self, msg: r.StopLive) -> r.LiveReply:
        live = self._live(msg.actor, msg.session_id)
        await self._save(live, stopRequested=True)
        if live.scope is not None:
            live.scope.cancel()
        return r.LiveReply(session=live.record)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
