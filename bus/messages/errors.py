"""The wire form of an error answer (handler failure, broker refusal, lost worker)."""

from __future__ import annotations

from .base import Family, Message


class ErrorReply(Message, tag="bus.error"):
    """An error sent in place of a reply; the caller raises ``RemoteError(code, message)``."""

    code: str
    message: str = ""


FAMILY = Family("errors", __name__)
"""The errors messages and their one Decoder (define every message above this line)."""
