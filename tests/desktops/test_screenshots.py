"""Host-side screenshots: libvirt's PPM turned into the PNG the API serves (no I/O)."""

from __future__ import annotations

import pytest

from dovecote.vmmgr.screenshots import ScreenshotError, png_size, to_png
from tests.desktops.png import decode


def ppm(width: int, height: int, pixel: bytes = b"\x10\x20\x30", comment: bool = False) -> bytes:
    header = b"P6\n" + (b"# QEMU screendump\n" if comment else b"") + f"{width} {height}\n255\n".encode()
    return header + pixel * (width * height)


def test_a_ppm_becomes_a_png_with_the_same_pixels() -> None:
    png = to_png(ppm(7, 3, comment=True), "image/x-portable-pixmap")
    assert png_size(png) == (7, 3)
    width, height, rows = decode(png)
    assert (width, height) == (7, 3)
    assert rows == [b"\x10\x20\x30" * 7] * 3


def test_a_png_passes_through_and_garbage_is_refused() -> None:
    png = to_png(ppm(2, 2))
    assert to_png(png, "image/png") == png
    with pytest.raises(ScreenshotError):
        to_png(b"GIF89a....")
    with pytest.raises(ScreenshotError):
        to_png(ppm(4, 4)[:-5])
    assert png_size(b"not a png") == (0, 0)
