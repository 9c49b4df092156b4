"""Sockets the kernel still holds half-closed: what a server that forgets to close leaves."""

from __future__ import annotations

import trio

TCP_STATES = {"08": "CLOSE_WAIT", "09": "LAST_ACK"}
SETTLE_S = 10.0
"""How long a server has to close what its clients closed."""


def lingering_sockets(port: int) -> list[str]:
    """The server's sockets on ``port`` in CLOSE-WAIT or LAST-ACK, from /proc/net/tcp{,6}.

    Only the server's end (local port ``port``): a client's socket in CLOSE-WAIT is a
    client that has not closed what the server closed (a keep-alive connection the
    server ended after its idle timeout, in a client object nobody closed), not a
    server that forgot to close.
    """
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state in TCP_STATES:
                found.append(f"{TCP_STATES[state]} {local} -> {remote}")
    return found


async def wait_no_lingering_sockets(port: int, timeout_s: float = SETTLE_S) -> list[str]:
    """Poll until no socket on ``port`` is in CLOSE-WAIT/LAST-ACK; what is left at the end."""
    with trio.move_on_after(timeout_s):
        while lingering_sockets(port):  # noqa: ASYNC110 - the kernel's table has no event
            await trio.sleep(0.25)
    return lingering_sockets(port)
