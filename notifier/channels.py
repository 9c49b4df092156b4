"""Notification channels (placeholder: the channels work replaces this module)."""

from __future__ import annotations

from typing import Any


class ChannelStore:
    """The teams' channels and the ``/v1/channels*`` handlers."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def register(self) -> None:
        """Register the bus handlers."""
