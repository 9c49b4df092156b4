"""Test helpers of the recorder: PNGs, a moto S3 server, an in-process recorder on the real bus."""

from __future__ import annotations

import contextlib
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from dovecote.vmmgr.vnc_protocol import RfbClient
from tests.helpers.capsules import IMAGE_DIR, Api, api_client, libvirt_ready, wait_status
from tests.helpers.s3 import moto_server, s3_env  # noqa: F401  (used by the recorder tests)
from tests.helpers.suite import Suite


def png(width: int, height: int, rgb: tuple[int, int, int], mark: int = 0) -> bytes:
    """A solid ``rgb`` PNG; ``mark`` > 0 draws a bar of that many pixels (another screen)."""
    rows = []
    for y in range(height):
        row = bytearray(bytes(rgb) * width)
        if mark and y < 4:
            row[: 3 * min(mark, width)] = b"\xff\xff\xff" * min(mark, width)
        rows.append(b"\x00" + bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


class Viewer:
    """An RFB client over the live view's WebSocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.rfb = RfbClient(keep_pixels=True)

    async def handshake(self) -> None:
        with trio.fail_after(30):
            while not self.rfb.ready:
                out = self.rfb.feed(await self.ws.get_message())
                if out:
                    await self.ws.send_message(out)

    async def frame(self, incremental: bool = False) -> float:
        """Ask for the whole screen; seconds until the update arrived."""
        have = len(self.rfb.frames)
        started = time.monotonic()
        await self.ws.send_message(self.rfb.request(incremental))
        with trio.fail_after(30):
            while len(self.rfb.frames) == have:
                out = self.rfb.feed(await self.ws.get_message())
                if out:
                    await self.ws.send_message(out)
        return time.monotonic() - started


COLOURS = ("#c81e1e", "#1ec81e", "#1e1ec8")


@contextlib.contextmanager
def desktop_capsule() -> Iterator[tuple[Suite, Api, str]]:
    reason = libvirt_ready()
    if reason:
        pytest.fail(f"VM tests need libvirt (infra/system-deps.sh installs it): {reason}")
    top = Path(tempfile.mkdtemp(prefix="dclvd-", dir="/tmp"))
    top.chmod(0o755)
    suite = Suite(data_dir=top / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
        "DOVECOTE_DESKTOP_TEMPLATE": "true", "DOVECOTE_VM_BOOT_TIMEOUT_S": "900"})
    try:
        suite.wait_ready()
        (top / "data").chmod(0o755)
        api = api_client(suite, "Ana")
        deadline = time.monotonic() + 2400  # a first desktop image and template take long
        while True:
            response = api.post("/v1/capsules", {"template": "desktop"})
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(10)
        assert response.status_code == 202, response.text
        capsule_id = response.json()["id"]
        try:
            wait_status(api, capsule_id, "running", timeout=900)
            yield suite, api, capsule_id
        finally:
            api.delete(f"/v1/capsules/{capsule_id}")
            wait_status(api, capsule_id, "stopped", "error", "missing", timeout=120)
    except BaseException:
        print("".join(suite.output[-100:]))
        raise
    finally:
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


def bgrx(colour: str) -> bytes:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return bytes((b, g, r))


def corners(viewer: Viewer) -> list[bytes]:
    w, h, px = viewer.rfb.width, viewer.rfb.height, viewer.rfb.pixels
    return [bytes(px[4 * (y * w + x):4 * (y * w + x) + 3])
            for x, y in ((2, 2), (w - 3, 2), (2, h - 3), (w - 3, h - 3))]


async def action_to_frame(api: Api, capsule_id: str, viewer: Viewer, colour: str) -> tuple[float, float]:
    """Paint the root window through the exec API. Returns (seconds the action took, seconds
    from the action's answer until the viewer had the changed frame; 0 if it already had it)."""
    want = bgrx(colour)
    began = time.monotonic()
    done = 0.0

    def paint() -> None:
        nonlocal done
        response = api.post(f"/v1/capsules/{capsule_id}/exec", {
            "cmd": f"xsetroot -solid '{colour}'", "user": "dove", "envs": {"DISPLAY": ":0"}})
        done = time.monotonic()
        assert response.status_code == 200 and response.json()["exit_code"] == 0, response.text

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, paint)
        with trio.fail_after(20):
            while want not in corners(viewer):  # the root window shows in a corner
                await viewer.frame(incremental=True)
        seen = time.monotonic()
    return done - began, max(0.0, seen - done)  # the nursery waited for paint()
