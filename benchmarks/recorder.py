"""Recorder and live view benchmarks: bundle bytes per action, export time, frame latency.

Run: ``.venv/bin/python benchmarks/recorder.py [--actions 100] [--vm]``.

Part 1 (about 30 s) starts a moto S3 server, an embedded PostgreSQL, a bus
broker and the recorder service in this process, records ``--actions``
actions, each with a 1280x800 screenshot (one action in three leaves the
screen as it was), exports the review bundle to S3 and prints:

* bundle bytes per action: the bundle's size over the distinct screenshots'
  size, per action (target: at most 1 KB), and the bundle against "distinct
  screenshots + 1 KB per action";
* export time for the actions to S3 (target: at most 5 s), and the time of a
  second export after 10 more actions (only new screenshots are uploaded).

Part 2 (``--vm``, several minutes under TCG) starts ``dovecote up`` with VMs
and the desktop template, creates a ``desktop`` capsule (X.Org on the VM's
VGA) and opens its live view through the gateway's WebSocket (viewer token,
bus stream, vmmgr, QEMU's VNC server), then prints the frame latency p50/p99
of an action (``xsetroot`` through the capsule exec API, one second apart)
until the viewer has the changed frame, and of a full-screen update request.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dovecote.bus import BusEndpoints, open_broker, open_bus  # noqa: E402
from dovecote.bus.messages import recorder as r  # noqa: E402
from dovecote.libs.config import load_config  # noqa: E402
from dovecote.libs.embedded_pg import start_embedded_postgres  # noqa: E402
from dovecote.libs.runtime import serve_service  # noqa: E402
from dovecote.recorder.service import SPEC  # noqa: E402
from tests.recorder.helpers import moto_server, s3_env  # noqa: E402


def screen(seed: int, width: int = 1280, height: int = 800) -> bytes:
    """A desktop-like PNG: flat panels, a few windows and some text-like noise."""
    rng = random.Random(seed)
    rows = []
    bg = bytes((40, 60, 90))
    windows = [(rng.randrange(0, width - 400), rng.randrange(0, height - 300), rng.randrange(200, 400),
                rng.randrange(150, 300), bytes((rng.randrange(200, 256),) * 3)) for _ in range(3)]
    for y in range(height):
        row = bytearray(bg * width)
        for wx, wy, ww, wh, colour in windows:
            if wy <= y < wy + wh:
                row[wx * 3:(wx + ww) * 3] = colour * ww
                if (y - wy) % 14 < 9:  # "text" lines
                    for x in range(wx + 8, wx + ww - 8, 5):
                        if rng.random() < 0.5:
                            row[x * 3:x * 3 + 6] = b"\x10\x10\x10" * 2
        rows.append(b"\x00" + bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))


async def export_benchmark(actions: int) -> None:
    top = Path(tempfile.mkdtemp(prefix="dcrecb-", dir="/tmp"))
    pg = start_embedded_postgres(top / "pg", settings={"fsync": "off", "synchronous_commit": "off"})
    try:
        with moto_server() as s3_url:
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            os.environ.update(s3_env(s3_url, bucket))
            endpoints = BusEndpoints.local(top / "bus")
            env = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
            env.update(endpoints.to_env())
            env.update({"DATABASE_URL": pg.url, "DOVECOTE_DATA_DIR": str(top / "data")})
            config = load_config(SPEC.config_cls, env)
            print(f"making {actions // 3 * 2 + 20} distinct 1280x800 screens...", flush=True)
            screens = [screen(i) for i in range(actions // 3 * 2 + 20)]
            async with open_broker(endpoints), trio.open_nursery() as nursery:
                ctx = await nursery.start(lambda task_status: serve_service(
                    SPEC, config, environ=env, task_status=task_status))
                async with open_bus(endpoints, "bench") as bus:
                    await report_export(bus, bucket, screens, actions)
                ctx.stop()
    finally:
        pg.stop()
        shutil.rmtree(top, ignore_errors=True)


async def report_export(bus: Any, bucket: str, screens: list[bytes], actions: int) -> None:
    async def ask(msg: Any) -> Any:
        return await bus.request("recorder", msg, timeout=120)

    sid = "bench-" + uuid.uuid4().hex[:8]
    await ask(r.OpenSubject(subject_id=sid, team_id="bench", meta={"provider": "qemu"}))
    used: list[bytes] = []
    nxt = 0
    started = time.monotonic()
    for i in range(actions):
        if i % 3 == 2 and used:
            png = used[-1]  # this action left the screen unchanged
        else:
            png, nxt = screens[nxt], nxt + 1
        used.append(png)
        await ask(r.RecordEntry(subject_id=sid, kind="action", actor="api_key:bench", summary={
            "action": {"kind": "type_text", "text": f"step {i}"},
            "receipt": {"status": "ok", "receipt_id": str(uuid.uuid4()), "action_type": "type_text",
                        "result": {"typed": f"step {i}"}}}, screenshot_png=png))
    record_s = time.monotonic() - started
    began = time.monotonic()
    exported = await ask(r.ExportBundle(subject_id=sid))
    export_s = time.monotonic() - began
    links = await ask(r.GetBundle(subject_id=sid))
    bundle = sum(f.size for f in links.files)
    distinct = {hashlib.sha256(p).hexdigest(): len(p) for p in used}
    screens_bytes = sum(distinct.values())
    per_action = (bundle - screens_bytes) / actions
    print(f"recorded {actions} actions in {record_s:.2f} s ({actions / record_s:.0f}/s); "
          f"{len(distinct)} distinct screens, {screens_bytes / 1e6:.2f} MB")
    print(f"export of {actions} actions to S3: {export_s:.2f} s (target <= 5 s), "
          f"{exported.uploaded} objects written")
    print(f"bundle: {bundle} bytes = distinct screenshots {screens_bytes} + {bundle - screens_bytes} "
          f"({per_action:.0f} bytes per action; target <= 1024): "
          f"{'OK' if bundle <= screens_bytes + 1024 * actions else 'OVER'}")
    for i in range(10):
        await ask(r.RecordEntry(subject_id=sid, kind="action", summary={"i": i},
                                screenshot_png=screens[nxt + i % 2]))
    began = time.monotonic()
    again = await ask(r.ExportBundle(subject_id=sid))
    print(f"second export after 10 more actions (2 new screens): {time.monotonic() - began:.2f} s, "
          f"{again.uploaded} objects written")


async def live_view_benchmark(samples: int) -> None:
    from trio_websocket import open_websocket_url

    from tests.recorder.helpers import COLOURS, Viewer, action_to_frame, desktop_capsule

    with desktop_capsule() as (suite, api, capsule_id):
        token = api.post(f"/v1/capsules/{capsule_id}/live-view/token").json()
        url = suite.url.replace("http://", "ws://") + token["websocket_path"]
        async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
            viewer = Viewer(ws)
            await viewer.handshake()
            await viewer.frame()
            full = sorted([await viewer.frame() for _ in range(samples)])
            actions, changed, total = [], [], []
            for i in range(samples):
                await trio.sleep(1.0)  # idle between actions
                ran, after = await action_to_frame(api, capsule_id, viewer, COLOURS[i % 3])
                actions.append(ran)
                changed.append(after)
                total.append(ran + after)
        for xs in (actions, changed, total):
            xs.sort()
        size = f"{viewer.rfb.width}x{viewer.rfb.height}"
        print(f"live view {size}: action answered -> changed frame seen by the viewer "
              f"p50 {_ms(changed, 0.5)} ms, p99 {_ms(changed, 0.99)} ms over {samples} actions "
              "(target p50 <= 500 ms)")
        print(f"  the action itself (xsetroot through the exec API) took p50 {_ms(actions, 0.5)} ms, "
              f"p99 {_ms(actions, 0.99)} ms; request -> seen p50 {_ms(total, 0.5)} ms, "
              f"p99 {_ms(total, 0.99)} ms")
        print(f"live view {size}: full-frame request -> frame seen p50 {_ms(full, 0.5)} ms, "
              f"p99 {_ms(full, 0.99)} ms over {samples} frames (Raw encoding, 32 bpp)")


def _ms(sorted_s: list[float], q: float) -> int:
    return int(sorted_s[min(len(sorted_s) - 1, int(len(sorted_s) * q))] * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=100)
    parser.add_argument("--vm", action="store_true", help="also measure the live view on a capsule")
    parser.add_argument("--frames", type=int, default=30)
    args = parser.parse_args()
    trio.run(export_benchmark, args.actions)
    if args.vm:
        trio.run(live_view_benchmark, args.frames)


if __name__ == "__main__":
    main()
