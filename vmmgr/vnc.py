"""The live view on the vmmgr side: a capsule's display (QEMU's VNC server) ⇄ a bus stream.

The gateway opens a bus stream to ``vmmgr.<host_id>`` with
:class:`~dovecote.bus.messages.recorder.StreamVnc` for each viewer; the handler
checks the capsule like every operation (scope, ``running``, its agent), opens
its own connection to the display's unix socket (the driver's
``display_socket``: libvirt's, read from the live domain), says
:class:`~dovecote.bus.messages.recorder.VncStarted`, then relays raw RFB bytes
both ways through :class:`~dovecote.vmmgr.vnc_protocol.RelayCore`.

One display connection per viewer keeps viewers independent: the bus stream's
credit window holds at most ``window`` frames per viewer, a viewer that stops
reading stops its own relay task reading the display socket, and QEMU
throttles that one client (its VNC server never blocks the VM on a slow
socket). :class:`~dovecote.bus.messages.recorder.ProbeVnc` is the live view's
health check: connect, handshake, ask for one pixel, time the answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from dovecote.bus.messages import recorder as r
from dovecote.bus.stream import Stream
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.vnc_protocol import RelayCore, RfbClient, RfbError, plan_status

log = get_logger("dovecote.vmmgr.vnc")

READ_SIZE = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
PROBE_HANDSHAKE_S = 3.0
PROBE_FRAME_S = 5.0
KEEP_FRESH_S = 0.25
"""While a viewer watches, a throwaway connection this often keeps QEMU's refresh quick (below)."""


def unavailable(reason: str) -> ServiceError:
    return ServiceError(409, "live_desktop_view_unavailable", reason)


class LiveView:
    """The live view handlers of one vmmgr (on top of its :class:`Capsules`)."""

    def __init__(self, capsules: Capsules) -> None:
        self.capsules = capsules

    def register(self, handle: Callable[[type, Any], None],
                 handle_stream: Callable[[type, Any], None]) -> None:
        handle_stream(r.StreamVnc, self.stream)
        handle(r.ProbeVnc, self.probe)

    async def _socket(self, msg: Any) -> Path:
        row, _agent = await self.capsules.agent_of(msg)
        driver, _ = await self.capsules.machines.require_soon()
        path = await driver.display_socket(row["id"])
        if path is None:
            raise unavailable("this capsule's VM has no display (started without one, or this "
                              "host's VM driver runs none)")
        return path

    @staticmethod
    async def _connect(path: Path) -> trio.SocketStream:
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                return await trio.open_unix_socket(str(path))
        except (OSError, trio.TooSlowError) as exc:
            raise unavailable(f"the VM's display does not answer: {exc}") from None

    async def stream(self, msg: r.StreamVnc, stream: Stream) -> None:
        path = await self._socket(msg)
        sock = await self._connect(path)
        async with sock:
            down: list[bytes] = []
            up: list[bytes] = []
            core = RelayCore(to_viewer=down.append, to_display=up.append)
            await stream.send(r.VncStarted())

            async def display_to_viewer(cancel: trio.CancelScope) -> None:
                try:
                    while True:
                        data = await sock.receive_some(READ_SIZE)
                        if not data:
                            break
                        core.from_display(data)
                        while down:
                            await stream.send(down.pop(0))  # waits for credit: backpressure
                finally:
                    cancel.cancel()

            async def viewer_to_display(cancel: trio.CancelScope) -> None:
                try:
                    async for frame in stream:
                        if not isinstance(frame, bytes):
                            raise ServiceError(400, "invalid_request", "a live view stream carries bytes")
                        core.from_viewer(frame)
                        while up:
                            await sock.send_all(up.pop(0))
                finally:
                    cancel.cancel()

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(display_to_viewer, nursery.cancel_scope)
                    nursery.start_soon(viewer_to_display, nursery.cancel_scope)
                    nursery.start_soon(keep_fresh, path)
            except RfbError as exc:
                raise ServiceError(502, "display_protocol_error", str(exc)) from None
            except trio.BrokenResourceError:
                pass
            log.info("live view closed", extra={"capsule_id": msg.capsule_id,
                                                "display_bytes": core.display_bytes,
                                                "viewer_bytes": core.viewer_bytes})

    async def probe(self, msg: r.ProbeVnc) -> r.VncStatus:
        path = await self._socket(msg)
        try:
            sock = await self._connect(path)
        except ServiceError:
            status, reason = plan_status(connected=False, handshake=False, frame_s=None)
            return r.VncStatus(status=status, reason=reason)
        client = RfbClient()
        frame_s: float | None = None
        async with sock:
            try:
                with trio.move_on_after(PROBE_HANDSHAKE_S):
                    while not client.ready:
                        data = await sock.receive_some(READ_SIZE)
                        if not data:
                            break
                        await sock.send_all(client.feed(data))
                if client.ready:
                    asked = time.monotonic()
                    await sock.send_all(client.request(False, 0, 0, 1, 1))
                    with trio.move_on_after(PROBE_FRAME_S):
                        while not client.frames:
                            data = await sock.receive_some(READ_SIZE)
                            if not data:
                                break
                            client.feed(data)
                    if client.frames:
                        frame_s = time.monotonic() - asked
            except (OSError, trio.BrokenResourceError, RfbError) as exc:
                log.info("live view probe failed", extra={"capsule_id": msg.capsule_id, "error": str(exc)})
        status, reason = plan_status(connected=True, handshake=client.ready, frame_s=frame_s)
        return r.VncStatus(status=status, reason=reason, width=client.width, height=client.height,
                           frame_age_ms=None if frame_s is None else int(frame_s * 1000))


async def keep_fresh(path: Path) -> None:
    """Keep QEMU's VNC refresh at its base rate while a viewer watches.

    QEMU checks the display for changes on a timer that backs off, 50 ms per
    idle tick, up to 3 s: after a quiet minute a change takes up to 3 s to
    reach a viewer. A new client connection resets the timer to 30 ms, so this
    task opens one (and closes it after the server's greeting) every
    :data:`KEEP_FRESH_S`; measured on this machine, an idle display then
    answers in about 80 ms instead of 1-3 s.
    """
    while True:
        with trio.move_on_after(2.0):
            try:
                sock = await trio.open_unix_socket(str(path))
                async with sock:
                    await sock.receive_some(12)
            except (OSError, trio.BrokenResourceError):
                return
        await trio.sleep(KEEP_FRESH_S)

