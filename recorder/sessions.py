"""Review recording and live view metadata of qemu desktop sessions: what the desktops service calls.

The desktops service holds one :class:`SessionRecording` and calls it at the
session's boundaries (hook points in ``services/desktops/qemu.py`` and
``sessions.py``); each call records through the recorder (best effort, see
:mod:`.client`) and refreshes the session record's ``review_recording`` (the
recorder's true summary) and ``live_desktop_view`` (``mode: stream``,
``provider_surface: qemu_novnc``, ``status`` from vmmgr's probe of the VM's
display). Sessions are duck-typed (``id``, ``team_id``, ``record``,
``capsule_id``, ``capsule_host``) so this module needs nothing of the
desktops service.

An action is recorded after its receipt is answered, off the receipt's path
(a host screenshot, the timeline entry, the summary and, when stale, a probe of
the display took ~140 ms per action): :meth:`SessionRecording.queue_action`
puts it on the session's queue, which one task in the service's nursery records
in order. The screenshot stays the screen the action left: the session's next
action waits (:meth:`~SessionRecording.screen_taken`) until it is captured.
A read of the review (a session's GET, hence its export) and the session's close
wait until the queue is recorded (:meth:`~SessionRecording.flushed`), so the
timeline they see is complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from dovecote.bus.messages import capsules as c
from dovecote.bus.messages import desktops as d
from dovecote.bus.messages import recorder as r
from dovecote.libs.errors import DovecoteError
from dovecote.libs.logs import get_logger
from dovecote.recorder.client import Evidence

log = get_logger("dovecote.recorder.sessions")

PROBE_TIMEOUT_S = 15.0
PROBE_EVERY_S = 10.0
"""A session's GET (and a recorded action) re-probes its display when the last probe is older than this."""
CAPTURE_TIMEOUT_S = 30.0
QUEUE_SIZE = 64
"""Actions of one session waiting to be recorded before the next one waits for room."""
FLUSH_TIMEOUT_S = 60.0
"""How long a read of the review waits for the session's queued actions to be recorded."""


def stream_view(session_id: str, status: Any, reason: str | None) -> d.LiveDesktopView:
    return d.LiveDesktopView(mode="stream", status=status, provider_surface="qemu_novnc",
                             matches_action_plane=True,
                             canonical_url=f"/api/sessions/{session_id}/live-view/",
                             debug_url=None, reason=reason, refresh_interval_ms=None)


class SessionRecording:
    """Evidence and live view metadata of the qemu sessions of one desktops service."""

    def __init__(self, bus: Any, nursery: trio.Nursery) -> None:
        self.bus = bus
        self.nursery = nursery
        """Where each session's recording task runs (the service's)."""
        self.evidence = Evidence(bus)
        self._probed: dict[str, float] = {}
        self._queues: dict[str, _ActionQueue] = {}

    async def capture(self, session: Any, actor: Any) -> bytes | None:
        """The VM's display as PNG, from its host (None if it cannot be had now)."""
        if session.capsule_id is None or session.capsule_host is None:
            return None
        try:
            reply = await self.bus.request(f"vmmgr.{session.capsule_host}", c.CaptureScreen(
                actor=actor, capsule_id=session.capsule_id), timeout=CAPTURE_TIMEOUT_S)
        except DovecoteError as exc:
            log.info("no screenshot for the review timeline", extra={"session_id": session.id,
                                                                     "error": str(exc)})
            return None
        return bytes(reply.png)

    async def refresh(self, session: Any, actor: Any) -> None:
        """Before a session is shown: its queued actions recorded, the summary now, the
        display's status if not checked lately."""
        await self.flushed(session)
        await self._refresh_now(session, actor)

    async def _refresh_now(self, session: Any, actor: Any) -> None:
        await self._summary(session)
        if time.monotonic() - self._probed.get(session.id, 0.0) >= PROBE_EVERY_S:
            await self.refresh_view(session, actor)

    async def _summary(self, session: Any) -> None:
        summary = await self.evidence.summary(session.id)
        session.record.review_recording = msgspec.convert(summary, d.ReviewRecordingSummary)

    async def refresh_view(self, session: Any, actor: Any) -> None:
        """Probe the VM's display through its vmmgr; the live view's status says what it found."""
        self._probed[session.id] = time.monotonic()
        if session.capsule_id is None or session.capsule_host is None:
            session.record.live_desktop_view = stream_view(
                session.id, "unavailable", "the session's VM is not created yet")
            return
        try:
            got: r.VncStatus = await self.bus.request(
                f"vmmgr.{session.capsule_host}", r.ProbeVnc(actor=actor, capsule_id=session.capsule_id),
                timeout=PROBE_TIMEOUT_S)
            session.record.live_desktop_view = stream_view(session.id, got.status, got.reason)
        except DovecoteError as exc:
            session.record.live_desktop_view = stream_view(session.id, "unavailable", str(exc))

    async def opened(self, session: Any) -> None:
        rec = session.record
        await self.evidence.open(session.id, session.team_id, meta={
            "provider": rec.provider, "qemu_profile": rec.qemu_profile, "width": rec.width,
            "height": rec.height, "desktop_user": rec.desktop_user, "capsule_id": session.capsule_id})
        await self._summary(session)
        rec.live_desktop_view = stream_view(session.id, "unavailable", "the desktop is starting")

    async def state(self, session: Any, actor: Any) -> None:
        rec = session.record
        png = await self.capture(session, actor)
        await self.evidence.state(session.id, rec.readiness_state, png,
                                  bridge_status=rec.bridge_status, bridge_error=rec.bridge_error)
        if rec.readiness_state == "failed":
            await self.evidence.failed(session.id, rec.bridge_error or "the session failed")
        await self._summary(session)
        await self.refresh_view(session, actor)

    async def queue_action(self, session: Any, actor: Any, action: Any, receipt: Any) -> None:
        """After an action's receipt: record it (the screen it left, the action and its
        receipt) in the session's order, from the session's recording task.

        Called while the session runs no other action; returns at once unless
        :data:`QUEUE_SIZE` actions already wait.
        """
        queue = self._queues.get(session.id)
        if queue is None:
            queue = self._queues[session.id] = _ActionQueue()
            self.nursery.start_soon(self._serve_queue, session, queue)
        captured = trio.Event()
        queue.captured = captured
        await queue.send.send(_Queued(actor=actor, action=action, receipt=receipt, captured=captured))

    async def screen_taken(self, session: Any) -> None:
        """Wait until the screen the session's last action left is captured (the next action
        may change it)."""
        queue = self._queues.get(session.id)
        if queue is not None:
            with trio.move_on_after(CAPTURE_TIMEOUT_S + 5):
                await queue.captured.wait()

    async def flushed(self, session: Any) -> None:
        """Wait (at most :data:`FLUSH_TIMEOUT_S`) until the session's queued actions are recorded."""
        queue = self._queues.get(session.id)
        if queue is None:
            return
        done = trio.Event()
        with trio.move_on_after(FLUSH_TIMEOUT_S):
            try:
                await queue.send.send(done)
            except trio.ClosedResourceError:
                return
            await done.wait()

    async def _serve_queue(self, session: Any, queue: _ActionQueue) -> None:
        async with queue.receive:
            async for item in queue.receive:
                if isinstance(item, trio.Event):  # a flush: everything before it is recorded
                    item.set()
                    continue
                try:
                    await self._record_action(session, item)
                except Exception:  # recording is best effort: the session's next ones still go
                    log.exception("an action was not recorded", extra={"session_id": session.id})

    async def _record_action(self, session: Any, item: _Queued) -> None:
        try:
            png = await self.capture(session, item.actor)
        finally:
            item.captured.set()
        actor = item.actor
        who = f"{actor.auth_type}:{actor.api_key_id or actor.user_id}"
        await self.evidence.action(session.id, who, d.action_dict(item.action), item.receipt, png)
        await self._refresh_now(session, actor)

    async def closed(self, session: Any) -> None:
        """The session is gone: its queued actions recorded first, then its evidence closed."""
        self._probed.pop(session.id, None)
        await self.flushed(session)
        queue = self._queues.pop(session.id, None)
        if queue is not None:
            await queue.send.aclose()
        await self.evidence.close(session.id)


@dataclass(frozen=True, kw_only=True)
class _Queued:
    actor: Any
    action: Any
    receipt: Any
    captured: trio.Event


class _ActionQueue:
    """One session's actions waiting to be recorded, and the capture of the last one."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[_Queued | trio.Event](QUEUE_SIZE)
        self.captured = trio.Event()
        self.captured.set()
