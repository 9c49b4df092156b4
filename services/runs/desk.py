"""The desktop a run or live session drives: desktops-service calls on the owner's behalf, and events.

:class:`Hub` wakes the long polls of :class:`~dovecote.bus.messages.runs.WaitEvents`
when an event is appended. :class:`Desk` is one desktop session seen from a
run: each action is a ``desktops.action`` bus request, followed by a
screenshot stored once per content (SHA-256) and an event for each step.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import trio

from dovecote.bus.messages import desktops as d
from dovecote.bus.messages import runs as r
from dovecote.bus.messages.common import Principal
from dovecote.libs.errors import DovecoteError
from dovecote.libs.logs import get_logger
from dovecote.recorder.client import Evidence
from dovecote.services.runs.store import RunStore

log = get_logger("dovecote.runs.desk")

DESKTOPS = "desktops"
ACTION_TIMEOUT_S = 200.0
SETTLE_S = 0.3
"""A planner's screenshot is taken once the desktop had no new action for this long: with a real
model (seconds per step) that is after every action, while the model thinks; a burst of quick
steps shares one screenshot instead of each waiting for its own."""


class Hub:
    """Per-subject wake-ups for event long polls (no event is lost: take the waiter, then read)."""

    def __init__(self) -> None:
        self._waiters: dict[str, trio.Event] = {}
        self._versions: dict[str, int] = {}

    def waiter(self, subject_id: str) -> trio.Event:
        return self._waiters.setdefault(subject_id, trio.Event())

    def version(self, subject_id: str) -> int:
        """How many events were appended to the subject since this process started."""
        return self._versions.get(subject_id, 0)

    def notify(self, subject_id: str) -> None:
        self._versions[subject_id] = self._versions.get(subject_id, 0) + 1
        event = self._waiters.pop(subject_id, None)
        if event is not None:
            event.set()


Emit = Callable[..., Awaitable[r.Event]]
Announce = tuple[str, str, dict[str, Any]]
"""An event stored beside an action: (type, message, payload)."""


def png_size(png: bytes) -> tuple[int, int]:
    if len(png) >= 24 and png[:8] == b"\x89PNG\r\n\x1a\n":
        width, height = struct.unpack(">II", png[16:24])
        return int(width), int(height)
    return 0, 0


class Events:
    """Appends events of subjects to the store and wakes their readers."""

    def __init__(self, store: RunStore, hub: Hub) -> None:
        self.store = store
        self.hub = hub

    def emitter(self, subject_id: str, kind: r.SubjectKind, team_id: str) -> Emit:
        async def emit(
            type: str, message: str, payload: dict[str, Any] | None = None, level: str = "info"
        ) -> r.Event:
            with trio.CancelScope(shield=True):
                event = await self.store.append(
                    subject_id=subject_id,
                    kind=kind,
                    team_id=team_id,
                    type=type,
                    level=level,
                    message=message,
                    payload=payload or {},
                )
            self.hub.notify(subject_id)
            return event

        return emit


class Desk:
    """One desktop session driven on behalf of ``actor``."""

    def __init__(
        self,
        bus: Any,
        actor: Principal,
        store: RunStore,
        subject_id: str,
        emit: Emit,
        evidence: Evidence | None = None,
    ) -> None:
        self.bus = bus
        self.actor = actor
        self.store = store
        self.subject_id = subject_id
        self._emit = emit
        self._tail: trio.Event | None = None
        """Set once the last event queued by :meth:`emit_later` is stored."""
        self.evidence = evidence
        self.session_id: str | None = None
        self.background: trio.Nursery | None = None
        """Where the screenshot after an action is taken while the caller goes on (the planner's
        next model call does not wait for it; the nursery's owner waits for them all at its end)."""
        self._settling = False
        self._last_action_at = 0.0
        self._latest: tuple[d.ActionBase, d.ActionReceipt] | None = None

    async def create(self, width: int, height: int, provider: str, timeout_s: float) -> d.SessionRecord:
        reply: d.SessionReply = await self.bus.request(
            DESKTOPS,
            d.CreateSession(
                actor=self.actor, body=d.CreateSessionBody(provider=provider, width=width, height=height)
            ),
            timeout=120.0,
        )
        self.session_id = reply.session.id
        session = reply.session
        with trio.fail_after(timeout_s):
            while session.readiness_state != "runtime_ready":
                if session.readiness_state == "failed" or session.state in ("failed", "stopped"):
                    raise DeskError(f"the desktop session failed: {session.bridge_error or session.state}")
                await trio.sleep(1.0)
                got: d.SessionReply = await self.bus.request(
                    DESKTOPS, d.GetSession(actor=self.actor, session_id=session.id), timeout=30.0
                )
                session = got.session
        return session

    async def delete(self) -> None:
        if self.session_id is None:
            return
        try:
            await self.bus.request(
                DESKTOPS, d.DeleteSession(actor=self.actor, session_id=self.session_id), timeout=90.0
            )
        except DovecoteError as exc:
            log.warning(
                "could not delete a run's desktop session",
                extra={"session_id": self.session_id, "error": str(exc)},
            )

    async def emit(
        self, type: str, message: str, payload: dict[str, Any] | None = None, level: str = "info"
    ) -> r.Event:
        """Store an event after every event queued before it."""
        while self._tail is not None and not self._tail.is_set():
            await self._tail.wait()
        return await self._emit(type, message, payload, level)

    def emit_later(self, type: str, message: str, payload: dict[str, Any], level: str = "info") -> None:
        """Queue an event in :attr:`background`: stored in order, without the caller waiting."""
        assert self.background is not None
        previous, done = self._tail, trio.Event()
        self._tail = done

        async def store() -> None:
            try:
                if previous is not None:
                    await previous.wait()
                await self._emit(type, message, payload, level)
            finally:
                done.set()

        self.background.start_soon(store)

    async def act(
        self, action: d.ActionBase, *, screenshot: bool = True, announce: Sequence[Announce] = ()
    ) -> d.ActionReceipt:
        """Run one action, with its ``computer_action`` / ``tool_result`` / ``screenshot`` events.

        ``announce`` (e.g. the ``tool_call`` that asked for it) and ``computer_action`` are
        stored in that order while the action runs; ``tool_result`` follows its receipt.
        """
        assert self.session_id is not None
        raw = d.action_dict(action)
        announced = [*announce, ("computer_action", f"{raw['kind']}", {"action": raw})]

        async def announce_all() -> None:
            for event in announced:
                await self.emit(*event)

        request = d.RunAction(actor=self.actor, session_id=self.session_id, action=action)  # type: ignore[arg-type]
        if self.background is not None:  # a planner step: queued in order, stored behind it
            for event in announced:
                self.emit_later(*event)
            reply: d.ReceiptReply = await self.bus.request(DESKTOPS, request, timeout=ACTION_TIMEOUT_S)
        else:
            failed: DovecoteError | None = None
            async with trio.open_nursery() as nursery:  # the events are stored while the action runs
                nursery.start_soon(announce_all)
                try:
                    reply = await self.bus.request(DESKTOPS, request, timeout=ACTION_TIMEOUT_S)
                except DovecoteError as exc:
                    failed = exc
            if failed is not None:
                raise failed
        receipt = reply.receipt
        result: Announce = (
            "tool_result",
            f"{receipt.action_type}: {receipt.status}",
            {"receipt": msgspec.to_builtins(receipt)},
        )
        level = "info" if receipt.status == "ok" else "warning"
        if self.background is not None:  # the planner's next call does not wait for the insert
            self.emit_later(*result, level=level)
        else:
            await self.emit(*result, level=level)
        if screenshot and self.background is not None:
            self._latest = (action, receipt)
            self._last_action_at = trio.current_time()
            if self._settling:  # the pending capture will show this action's result instead
                if self.evidence is not None:
                    self.background.start_soon(self._after, action, receipt, False)
            else:
                self._settling = True
                self.background.start_soon(self._capture_when_settled)
        else:
            await self._after(action, receipt, screenshot)
        return receipt

    async def _capture_when_settled(self) -> None:
        """The screenshot once no action came for :data:`SETTLE_S` (beside the model's own time)."""
        try:
            while (wait := self._last_action_at + SETTLE_S - trio.current_time()) > 0:  # noqa: ASYNC110 - a debounce: each new action moves the deadline
                await trio.sleep(wait)
        finally:
            self._settling = False
        assert self._latest is not None
        await self._after(*self._latest, True)

    async def _after(self, action: d.ActionBase, receipt: d.ActionReceipt, screenshot: bool) -> None:
        png = await self.capture() if screenshot else None
        if self.evidence is not None:
            try:
                await self.evidence.action(self.subject_id, "agent", action, receipt, png)
            except DovecoteError as exc:
                log.warning("the recorder did not take an action", extra={"error": str(exc)})

    async def screenshot_png(self) -> bytes:
        assert self.session_id is not None
        reply: d.ScreenshotReply = await self.bus.request(
            DESKTOPS, d.GetScreenshot(actor=self.actor, session_id=self.session_id), timeout=60.0
        )
        return reply.png

    async def capture(self) -> bytes | None:
        """A screenshot stored once per content, and its ``screenshot`` event."""
        try:
            png = await self.screenshot_png()
        except DovecoteError as exc:
            await self.emit("log", f"no screenshot: {exc}", level="warning")
            return None
        sha = hashlib.sha256(png).hexdigest()
        width, height = png_size(png)
        new = await self.store.put_screenshot(self.subject_id, sha, png, width, height)
        await self.emit(
            "screenshot",
            "screenshot",
            {"sha256": sha, "new": new, "width": width, "height": height, "bytes": len(png)},
        )
        return png

    async def observe(self) -> d.Observation:
        assert self.session_id is not None
        reply: d.ObservationReply = await self.bus.request(
            DESKTOPS, d.GetObservation(actor=self.actor, session_id=self.session_id), timeout=60.0
        )
        return reply.observation


class DeskError(Exception):
    """The desktop could not be prepared."""
