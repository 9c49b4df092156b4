"""Screenshots of a VM's display, taken by the host (no guest agent involved).

libvirt's ``virDomainScreenshot`` asks QEMU for a ``screendump`` of the VM's
display device and streams it back, as PPM (``image/x-portable-pixmap``) with
libvirt 9 and QEMU 7. :func:`capture` reads that stream (blocking: run it in a
worker thread) and :func:`to_png` turns the image into a PNG, which is what
the API serves. The encoder is the smallest PNG there is (8-bit RGB, filter
0 on every row, zlib at level 1): fast, and a desktop compresses well anyway.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHUNK = 256 * 1024


class ScreenshotError(ValueError):
    """The display's image could not be read or decoded."""


def capture(conn: Any, dom: Any, screen: int = 0) -> bytes:
    """The display of ``dom`` now, as PNG (``conn``, ``dom``: libvirt objects; blocking)."""
    stream = conn.newStream(0)
    try:
        mime = dom.screenshot(stream, screen, 0)
        chunks: list[bytes] = []
        while True:
            data = stream.recv(CHUNK)
            if isinstance(data, int):  # -2: would block (never on a blocking stream)
                raise ScreenshotError(f"the screenshot stream answered {data}")
            if not data:
                break
            chunks.append(bytes(data))
        stream.finish()
    except BaseException:
        try:
            stream.abort()
        except Exception:  # already failing: the first error is the one to raise
            pass
        raise
    return to_png(b"".join(chunks), mime or "")


def to_png(data: bytes, mime: str = "") -> bytes:
    """``data`` (PNG or binary PPM, whatever ``mime`` says) as PNG."""
    if data.startswith(PNG_SIGNATURE):
        return data
    if data[:2] != b"P6":
        raise ScreenshotError(f"unexpected screenshot format {mime or data[:8]!r}")
    width, height, pixels = parse_ppm(data)
    return encode_png(width, height, pixels)


def parse_ppm(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB bytes of a binary (P6), 8-bit PPM."""
    fields: list[int] = []
    pos = 2
    while len(fields) < 3:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":  # a comment runs to the end of its line
            pos = data.index(b"\n", pos) + 1
            continue
        start = pos
        while pos < len(data) and data[pos:pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise ScreenshotError("a PPM header without its width, height and depth")
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    if maxval != 255:
        raise ScreenshotError(f"a PPM of depth {maxval} (only 255 is read)")
    pixels = data[pos + 1:pos + 1 + width * height * 3]
    if len(pixels) != width * height * 3:
        raise ScreenshotError("a PPM shorter than its header says")
    return width, height, pixels


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """A PNG of ``width`` x ``height`` 8-bit RGB pixels."""
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[row * stride:(row + 1) * stride] for row in range(height))
    return b"".join((
        PNG_SIGNATURE,
        _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
        _chunk(b"IDAT", zlib.compress(raw, 1)),
        _chunk(b"IEND", b""),
    ))


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header (0, 0 when it is not one)."""
    if len(png) < 24 or not png.startswith(PNG_SIGNATURE):
        return 0, 0
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
