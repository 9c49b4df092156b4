"""Messages used by the bus tests (and the worker subprocess)."""

from __future__ import annotations

from dovecote.bus import Message
from dovecote.bus.messages.base import Family, Request


class Echo(Message, tag="test.echo"):
    text: str = ""
    delay: float = 0.0
    fail: str = ""  # "bus" -> BusError with a code, "boom" -> plain exception


class EchoReply(Message, tag="test.echo_reply"):
    text: str
    worker: str = ""
    request_id: str | None = None


class Download(Message, tag="test.download"):
    frames: int
    size: int


class StateChanged(Message, tag="test.state_changed"):
    capsule: str
    state: str


class Lookup(Request[EchoReply], tag="test.lookup"):
    """A request declaring its reply type; ``refuse`` makes the handler refuse."""

    key: str
    refuse: int = 0


class Later(Request["LaterReply"], tag="test.later"):
    """A request whose reply type is declared before it exists (a forward reference)."""

    n: int = 0


class LaterReply(Message, tag="test.later_reply"):
    n: int


class IdempotentEcho(Echo, tag="test.idempotent_echo"):
    """An :class:`Echo` the client may send again when its worker is lost."""

    idempotent = True


FAMILY = Family("test", __name__)
