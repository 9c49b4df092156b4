"""One write per HTTP/1.1 answer: hypercorn's h11 protocol with the head sent with the body.

hypercorn writes an answer in pieces: the status line and headers (one
``send`` on the socket), then the body (another), then the end of the
message (a third call, empty for a ``Content-Length`` body). Each piece is a
trip through the connection's send lock and a system call, and the client
wakes up for the head alone. For an answer whose length is known
(``Content-Length``, not 0) this protocol holds the head back and sends it
with the body, in one write, or with the end of the message (a ``HEAD``
answer, whose body is suppressed). Streamed answers (SSE, downloads: no
``Content-Length``) and empty ones are sent as before, the head at once.

The gateway serves with it by replacing the class hypercorn's protocol
wrapper instantiates (:func:`install`, called with the gateway's other
hypercorn adjustment in :mod:`dovecote.gateway.service`).
"""

from __future__ import annotations

from collections.abc import Iterable

import h11
import hypercorn.protocol
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol, H11SendableEvent


def _known_length(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-length":
            return value.strip() not in (b"", b"0")
    return False


class CoalescingH11Protocol(H11Protocol):
    """:class:`H11Protocol` that sends a known-length answer's head together with its body."""

    _held = b""

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        held, self._held = self._held, b""
        try:
            data = self.connection.send(event) or b""
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            data = b""
        else:
            if isinstance(event, h11.Response) and _known_length(event.headers):
                self._held = held + data  # goes with the body (or the end of the message)
                return
        if held or data:
            await self.send(RawData(data=held + data))


def install() -> None:
    """Make hypercorn serve HTTP/1.1 with :class:`CoalescingH11Protocol` (in this process)."""
    hypercorn.protocol.H11Protocol = CoalescingH11Protocol  # type: ignore[misc]
