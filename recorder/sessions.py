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
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from dovecote.bus.messages import capsules as c
from dovecote.bus.messages import desktops as d
from dovecote.bus.messages import recorder as r
from dovecote.libs.errors import DovecoteError
from dovecote.libs.logs import get_logger
from dovecote.recorder.client import Evidence

log = get_logger("dovecote.recorder.sessions")

PROBE_TIMEOUT_S = 15.0
PROBE_EVERY_S = 10.0
"""A session's GET re-probes its display when the last probe is older than this."""


def stream_view(session_id: str, status: Any, reason: str | None) -> d.LiveDesktopView:
    return d.LiveDesktopView(mode="stream", status=status, provider_surface="qemu_novnc",
                             matches_action_plane=True,
                             canonical_url=f"/api/sessions/{session_id}/live-view/",
                             debug_url=None, reason=reason, refresh_interval_ms=None)


class SessionRecording:
    """Evidence and live view metadata of the qemu sessions of one desktops service."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.evidence = Evidence(bus)
        self._probed: dict[str, float] = {}

    async def capture(self, session: Any, actor: Any) -> bytes | None:
        """The VM's display as PNG, from its host (None if it cannot be had now)."""
        if session.capsule_id is None or session.capsule_host is None:
            return None
        try:
            reply = await self.bus.request(f"vmmgr.{session.capsule_host}", c.CaptureScreen(
                actor=actor, capsule_id=session.capsule_id), timeout=30)
        except DovecoteError as exc:
            log.info("no screenshot for the review timeline", extra={"session_id": session.id,
                                                                     "error": str(exc)})
            return None
        return bytes(reply.png)

    async def refresh(self, session: Any, actor: Any) -> None:
        """Before a session is shown: the summary now, the display's status if not checked lately."""
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

    async def action(self, session: Any, actor: Any, action: Any, receipt: Any) -> None:
        """After an action: the screen it left, with the action and its receipt."""
        png = await self.capture(session, actor)
        who = f"{actor.auth_type}:{actor.api_key_id or actor.user_id}"
        await self.evidence.action(session.id, who, d.action_dict(action), receipt, png)
        await self._summary(session)
        await self.refresh_view(session, actor)

    async def closed(self, session: Any) -> None:
        self._probed.pop(session.id, None)
        await self.evidence.close(session.id)
