"""Deliveries of lifecycle events to channels (placeholder: the channels work replaces this module)."""

from __future__ import annotations

from typing import Any

import trio

from dovecote.bus.messages.events import LifecycleEvent


class Deliverer:
    """Delivers queued events to channels."""

    def __init__(self, ctx: Any, channels: Any) -> None:
        self.ctx = ctx
        self.channels = channels

    def enqueue(self, conn: Any, event_id: int, team_id: str, event: LifecycleEvent) -> None:
        """Queue the deliveries of one event (runs in the event's append transaction, in a thread)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled."""
        task_status.started()
        await trio.sleep_forever()
