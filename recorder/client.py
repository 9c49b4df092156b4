"""What a service that owns a subject calls: the recorder over the bus, best effort.

The desktops service (and later the browser and run services) records its
evidence through :class:`Evidence`; each call is one bus request to the
``recorder`` service. Recording never fails the caller's own work: if the
recorder does not answer, the call logs and returns ``None``, and the
subject's summary says ``unavailable`` with the reason. Hook points in the
desktops service (see docs/architecture.md, "Recorder and live view")::

    evidence = Evidence(bus)
    await evidence.open(session_id, team_id, meta={...})            # qemu product session created
    await evidence.state(session_id, "runtime_ready", png)          # each readiness change
    await evidence.action(session_id, actor, action, receipt, png)  # after each action
    await evidence.failed(session_id, reason, png)                  # the session failed
    await evidence.close(session_id)                                # DELETE /api/sessions/:id
    record.review_recording = await evidence.summary(session_id)    # a ReviewRecordingSummary dict
"""

from __future__ import annotations

from typing import Any

import msgspec

from dovecote.bus.messages import recorder as r
from dovecote.libs.errors import DovecoteError
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.recorder.client")

SERVICE = "recorder"
TIMEOUT_S = 15.0


def receipt_summary(action: Any, receipt: Any) -> dict[str, Any]:
    """The small, reviewable form of an action and its receipt (long values are cut by the recorder)."""
    a = msgspec.to_builtins(action)
    rc = msgspec.to_builtins(receipt)
    error = rc.get("error") or None
    return {"action": a, "receipt": {
        "status": rc.get("status"), "receipt_id": rc.get("receipt_id"),
        "action_type": rc.get("action_type"), "started_at": rc.get("started_at"),
        "completed_at": rc.get("completed_at"), "result": rc.get("result"),
        "error": None if error is None else {"code": error.get("code"), "message": error.get("message")}}}


class Evidence:
    """Best-effort recording of one service's subjects."""

    def __init__(self, bus: Any, kind: r.SubjectKind = "desktop_session") -> None:
        self.bus = bus
        self.kind = kind

    async def _ask(self, msg: Any) -> Any:
        try:
            return await self.bus.request(SERVICE, msg, timeout=TIMEOUT_S)
        except DovecoteError as exc:
            log.warning("the recorder did not record", extra={
                "subject_id": getattr(msg, "subject_id", None), "message": type(msg).__name__,
                "error": str(exc)})
            return None

    async def open(self, subject_id: str, team_id: str, meta: dict[str, Any] | None = None) -> None:
        await self._ask(r.OpenSubject(subject_id=subject_id, kind=self.kind, team_id=team_id,
                                      meta=meta or {}))

    async def action(self, subject_id: str, actor: str, action: Any, receipt: Any,
                     screenshot_png: bytes | None = None) -> int | None:
        got = await self._ask(r.RecordEntry(subject_id=subject_id, kind="action", actor=actor,
                                            summary=receipt_summary(action, receipt),
                                            screenshot_png=screenshot_png))
        return None if got is None else int(got.seq)

    async def state(self, subject_id: str, state: str, screenshot_png: bytes | None = None,
                    **details: Any) -> None:
        await self._ask(r.RecordEntry(subject_id=subject_id, kind="state_change",
                                      summary={"state": state, **details}, screenshot_png=screenshot_png))

    async def failed(self, subject_id: str, reason: str, screenshot_png: bytes | None = None) -> None:
        await self._ask(r.RecordEntry(subject_id=subject_id, kind="failure", summary={"reason": reason},
                                      screenshot_png=screenshot_png))
        await self._ask(r.MarkFailed(subject_id=subject_id, reason=reason))

    async def close(self, subject_id: str) -> None:
        await self._ask(r.CloseSubject(subject_id=subject_id))

    async def summary(self, subject_id: str) -> dict[str, Any]:
        """The subject's ReviewRecordingSummary as plain data (``unavailable`` if the recorder is away)."""
        got = await self._ask(r.GetSummary(subject_id=subject_id))
        if got is None:
            return msgspec.to_builtins(r.ReviewSummary(
                mode="unavailable", status="unavailable", retention="ephemeral_until_export",
                reason="the recorder does not answer"))
        return msgspec.to_builtins(got.summary)
