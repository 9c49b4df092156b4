"""The live view's RFB (VNC) protocol pieces, without I/O.

QEMU serves each capsule's display as an RFB server on a unix socket (libvirt
``<graphics type='vnc' socket=...>``, see :mod:`.domain_xml`). A viewer (noVNC
in a browser, through the gateway's WebSocket and a bus stream) speaks RFB to
it through :class:`RelayCore`, one QEMU connection per viewer, so a slow viewer
holds back only its own connection: QEMU throttles the updates of a client
whose socket is full and neither the VM nor the other viewers wait for it.

:class:`RelayCore` watches both directions of one viewer's connection until
the handshake is over and then passes bytes through untouched. It enforces
two things a viewer could otherwise do to the others:

- the *shared* flag of ClientInit is forced to 1: a viewer asking for
  exclusive access would make QEMU disconnect every other viewer;
- only the ``None`` security type is offered and accepted (the socket is
  private to the host; the viewer was authenticated by the gateway).

:class:`RfbClient` is a minimal client (the handshake, then framebuffer
updates in Raw encoding): vmmgr's probe uses it to ask for one pixel and time
the answer, and the tests and the benchmark use it to read whole frames.
:func:`plan_status` turns a probe into the live view's status.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

VERSION = b"RFB 003.008\n"
SEC_NONE = 1
ViewStatus = Literal["ready", "degraded", "stale", "unavailable"]


class RfbError(Exception):
    """The peer broke the RFB protocol (or refused us)."""


def server_init_length(buf: bytes | bytearray) -> int | None:
    """The length of a ServerInit at the start of ``buf`` (None: not all there yet)."""
    if len(buf) < 24:
        return None
    name_len = struct.unpack(">I", bytes(buf[20:24]))[0]
    if name_len > 4096:
        raise RfbError("desktop name too long")
    return 24 + name_len if len(buf) >= 24 + name_len else None


@dataclass
class RelayCore:
    """One viewer's RFB connection between the viewer and the display, without I/O.

    Feed what the display sends to :meth:`from_display` and what the viewer
    sends to :meth:`from_viewer`; they call ``to_viewer`` / ``to_display``
    with the bytes to forward (possibly rewritten during the handshake).
    """

    to_viewer: Callable[[bytes], None]
    to_display: Callable[[bytes], None]
    _down: bytearray = field(default_factory=bytearray)  # display → viewer, handshake only
    _up: bytearray = field(default_factory=bytearray)  # viewer → display, handshake only
    _down_step: str = "version"  # version, sectypes, secresult, serverinit, pass
    _up_step: str = "version"  # version, sectype, clientinit, pass
    width: int = 0
    height: int = 0
    display_bytes: int = 0
    viewer_bytes: int = 0

    @property
    def handshake_done(self) -> bool:
        return self._down_step == "pass" and self._up_step == "pass"

    def from_display(self, data: bytes) -> None:
        self.display_bytes += len(data)
        if self._down_step == "pass":
            self.to_viewer(data)
            return
        self._down += data
        while self._down_step != "pass":
            if not self._advance_down():
                return
        if self._down:
            rest, self._down = bytes(self._down), bytearray()
            self.to_viewer(rest)

    def _advance_down(self) -> bool:
        buf = self._down
        if self._down_step == "version":
            if len(buf) < 12:
                return False
            if not bytes(buf[:4]) == b"RFB ":
                raise RfbError("the display is not an RFB server")
            self.to_viewer(VERSION)  # both sides speak 3.8 whatever the server said
            del buf[:12]
            self._down_step = "sectypes"
        elif self._down_step == "sectypes":
            if not buf:
                return False
            count = buf[0]
            if count == 0:
                raise RfbError("the display refused the connection")
            if len(buf) < 1 + count:
                return False
            if SEC_NONE not in buf[1:1 + count]:
                raise RfbError("the display asks for authentication")
            self.to_viewer(bytes([1, SEC_NONE]))
            del buf[:1 + count]
            self._down_step = "secresult"
        elif self._down_step == "secresult":
            if len(buf) < 4:
                return False
            if bytes(buf[:4]) != b"\0\0\0\0":
                raise RfbError("the display refused the security handshake")
            self.to_viewer(bytes(buf[:4]))
            del buf[:4]
            self._down_step = "serverinit"
        elif self._down_step == "serverinit":
            n = server_init_length(buf)
            if n is None:
                return False
            self.width, self.height = struct.unpack(">HH", bytes(buf[:4]))
            self.to_viewer(bytes(buf[:n]))
            del buf[:n]
            self._down_step = "pass"
        return True

    def from_viewer(self, data: bytes) -> None:
        self.viewer_bytes += len(data)
        if self._up_step == "pass":
            self.to_display(data)
            return
        self._up += data
        buf = self._up
        while self._up_step != "pass":
            if self._up_step == "version":
                if len(buf) < 12:
                    return
                if bytes(buf[:4]) != b"RFB ":
                    raise RfbError("the viewer is not an RFB client")
                self.to_display(VERSION)
                del buf[:12]
                self._up_step = "sectype"
            elif self._up_step == "sectype":
                if not buf:
                    return
                if buf[0] != SEC_NONE:
                    raise RfbError("the viewer chose a security type that was not offered")
                self.to_display(bytes([SEC_NONE]))
                del buf[:1]
                self._up_step = "clientinit"
            elif self._up_step == "clientinit":
                if not buf:
                    return
                self.to_display(b"\x01")  # shared: never disconnect the other viewers
                del buf[:1]
                self._up_step = "pass"
        if buf:
            rest, self._up = bytes(buf), bytearray()
            self.to_display(rest)


@dataclass
class Frame:
    """A framebuffer update read by :class:`RfbClient` (Raw, 32 bpp little-endian BGRX)."""

    rects: list[tuple[int, int, int, int, bytes]]


class RfbClient:
    """A minimal RFB 3.8 client without I/O: ``feed`` bytes in, get bytes to send back.

    After the handshake it asks for 32-bit true colour in Raw encoding. Use
    :meth:`request` to ask for an update; completed updates land in
    :attr:`frames`. The framebuffer (``pixels``, BGRX rows) is kept up to date
    when ``keep_pixels`` is set.
    """

    def __init__(self, *, keep_pixels: bool = False) -> None:
        self.buf = bytearray()
        self.step = "version"
        self.width = self.height = 0
        self.name = ""
        self.frames: list[Frame] = []
        self.keep_pixels = keep_pixels
        self.pixels = bytearray()
        self.bell = 0

    @property
    def ready(self) -> bool:
        return self.step == "normal"

    def request(self, incremental: bool, x: int = 0, y: int = 0, w: int | None = None,
                h: int | None = None) -> bytes:
        return struct.pack(">BBHHHH", 3, int(incremental), x, y,
                           self.width if w is None else w, self.height if h is None else h)

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the server; return the bytes to send to it."""
        self.buf += data
        out = bytearray()
        while True:
            step = self._step(out)
            if not step:
                return bytes(out)

    def _step(self, out: bytearray) -> bool:
        buf = self.buf
        if self.step == "version":
            if len(buf) < 12:
                return False
            del buf[:12]
            out += VERSION
            self.step = "sectypes"
        elif self.step == "sectypes":
            if not buf or len(buf) < 1 + buf[0]:
                return False
            if buf[0] == 0 or SEC_NONE not in buf[1:1 + buf[0]]:
                raise RfbError("the server wants authentication or refused us")
            del buf[:1 + buf[0]]
            out += bytes([SEC_NONE])
            self.step = "secresult"
        elif self.step == "secresult":
            if len(buf) < 4:
                return False
            if bytes(buf[:4]) != b"\0\0\0\0":
                raise RfbError("security handshake failed")
            del buf[:4]
            out += b"\x01"  # shared
            self.step = "serverinit"
        elif self.step == "serverinit":
            n = server_init_length(buf)
            if n is None:
                return False
            self.width, self.height = struct.unpack(">HH", bytes(buf[:4]))
            self.name = bytes(buf[24:n]).decode("utf-8", "replace")
            del buf[:n]
            if self.keep_pixels:
                self.pixels = bytearray(self.width * self.height * 4)
            # 32 bpp, depth 24, little endian, true colour, 255/255/255, shifts 16/8/0
            out += struct.pack(">BxxxBBBBHHHBBBxxx", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
            out += struct.pack(">BxHi", 2, 1, 0)  # SetEncodings: Raw only
            self.step = "normal"
        else:
            return self._message()
        return True

    def _message(self) -> bool:
        buf = self.buf
        if not buf:
            return False
        kind = buf[0]
        if kind == 0:  # FramebufferUpdate
            if len(buf) < 4:
                return False
            count = struct.unpack(">H", bytes(buf[2:4]))[0]
            pos, rects = 4, []
            for _ in range(count):
                if len(buf) < pos + 12:
                    return False
                x, y, w, h, enc = struct.unpack(">HHHHi", bytes(buf[pos:pos + 12]))
                pos += 12
                if enc == -223:  # DesktopSize pseudo-encoding
                    rects.append((x, y, w, h, b""))
                    continue
                if enc != 0:
                    raise RfbError(f"unexpected encoding {enc}")
                size = w * h * 4
                if len(buf) < pos + size:
                    return False
                rects.append((x, y, w, h, bytes(buf[pos:pos + size])))
                pos += size
            del buf[:pos]
            if self.keep_pixels:
                for x, y, w, _h, data in rects:
                    for row in range(_h):
                        start = ((y + row) * self.width + x) * 4
                        self.pixels[start:start + w * 4] = data[row * w * 4:(row + 1) * w * 4]
            self.frames.append(Frame(rects=rects))
            return True
        if kind == 1:  # SetColourMapEntries
            if len(buf) < 6:
                return False
            n = struct.unpack(">H", bytes(buf[4:6]))[0]
            if len(buf) < 6 + 6 * n:
                return False
            del buf[:6 + 6 * n]
            return True
        if kind == 2:  # Bell
            del buf[:1]
            self.bell += 1
            return True
        if kind == 3:  # ServerCutText
            if len(buf) < 8:
                return False
            n = struct.unpack(">I", bytes(buf[4:8]))[0]
            if len(buf) < 8 + n:
                return False
            del buf[:8 + n]
            return True
        raise RfbError(f"unknown server message {kind}")


def plan_status(*, connected: bool, handshake: bool, frame_s: float | None,
                degraded_after_s: float = 1.0) -> tuple[ViewStatus, str | None]:
    """The live view's status from one probe of the display.

    ==========  =========  ===========================  ===========
    connected   handshake  frame answered in            status
    ==========  =========  ===========================  ===========
    no          -          -                            unavailable
    yes         no         -                            unavailable
    yes         yes        never (probe timed out)      stale
    yes         yes        more than degraded_after_s   degraded
    yes         yes        at most degraded_after_s     ready
    ==========  =========  ===========================  ===========
    """
    if not connected:
        return "unavailable", "the VM's display socket does not answer"
    if not handshake:
        return "unavailable", "the VM's display did not complete the RFB handshake"
    if frame_s is None:
        return "stale", "the VM's display did not send a frame when asked"
    if frame_s > degraded_after_s:
        return "degraded", f"the VM's display took {frame_s:.1f} s to send a frame"
    return "ready", None
