"""A tiny PNG reader for the tests (8-bit RGB/RGBA, non-interlaced): enough to compare screenshots."""

from __future__ import annotations

import struct
import zlib


def decode(png: bytes) -> tuple[int, int, list[bytes]]:
    """``(width, height, rows)``, each row ``width * 3`` bytes of RGB."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        prev = line
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
    return width, height, rows


def changed_pixels(before: bytes, after: bytes, box: tuple[int, int, int, int]) -> int:
    """How many pixels differ inside ``box`` (x, y, width, height) between two same-size PNGs."""
    w1, h1, rows1 = decode(before)
    w2, h2, rows2 = decode(after)
    assert (w1, h1) == (w2, h2)
    x0, y0, bw, bh = box
    count = 0
    for y in range(max(0, y0), min(h1, y0 + bh)):
        r1, r2 = rows1[y], rows2[y]
        for x in range(max(0, x0), min(w1, x0 + bw)):
            if r1[3 * x:3 * x + 3] != r2[3 * x:3 * x + 3]:
                count += 1
    return count
