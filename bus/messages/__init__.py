"""Bus message types, one module per domain, all deriving from :class:`Message`."""

from .base import Message, decode, encode, registered_messages
from .errors import ErrorReply
from .health import Ping, Pong

__all__ = ["ErrorReply", "Message", "Ping", "Pong", "decode", "encode", "registered_messages"]
