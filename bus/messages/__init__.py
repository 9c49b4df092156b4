"""Bus message types, one module per domain, all deriving from :class:`Message`."""

from .base import Message, decode, encode, registered_messages
from .common import ClientInfo, Failure, Principal
from .errors import ErrorReply
from .health import Ping, Pong

__all__ = [
    "ClientInfo",
    "ErrorReply",
    "Failure",
    "Message",
    "Ping",
    "Pong",
    "Principal",
    "decode",
    "encode",
    "registered_messages",
]
