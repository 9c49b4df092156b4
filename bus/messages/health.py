"""Health messages: every service answers ``Ping`` with ``Pong``."""

from __future__ import annotations

from .base import Family, Message


class Ping(Message, tag="health.ping"):
    """Ask a service whether it is alive."""

    idempotent = True


class Pong(Message, tag="health.pong", kw_only=True):
    """A service's answer to :class:`Ping`."""

    service: str
    status: str = "ok"
    version: str
    uptime_s: float
    details: dict[str, str] = {}


FAMILY = Family("health", __name__)
"""The health messages and their one Decoder (define every message above this line)."""
