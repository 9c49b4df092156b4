"""Browser session benchmarks: create → running, CDP round trips, screenshots.

Run: ``.venv/bin/python benchmarks/browser.py [--provider vm|host] [--sessions 3] [--rounds 300]``
(as root: libvirt, bubblewrap). Starts its own ``dovecote up``, signs up a user, and prints:

``--provider vm`` (the default; libvirt, ``DOVECOTE_BROWSER_TEMPLATE=true``; the first run
on a host builds the browser template, minutes under TCG, not counted):

* create → ``running`` p50/max over ``--sessions`` sessions, each a restore of the browser
  template (Chromium already running in the frozen VM), each ``--spare-wait-s`` after the
  last so that vmmgr's warm pool has remade its *browser spare* (restored and warmed up
  ahead of time: the create claims it), and one more right after, which finds no spare
  (a plain restore); the status is polled every 50 ms;
* a cold Chromium start in the same VM (a second headless Chromium with a fresh profile on
  another loopback port, started through the capsule's exec and timed inside the guest
  until its DevTools endpoint answers with a page), p50 over ``--cold`` starts. A cold
  create → running would be a restore of a VM without Chromium *plus* this, so the ratio
  printed (cold start / template create) is a lower bound of the real one;
* CDP round trip (``Runtime.evaluate`` of ``1+1`` on a page, p50/p99) through the gateway
  (WebSocket → gateway → bus stream → browsers service relay → bus stream → vmmgr → guest
  agent → TCP in the guest → Chromium) against straight to the guest (a CDP client inside
  the guest on Chromium's loopback port: no hop at all; it runs in the guest's Python under
  TCG, which makes its own overhead count against the floor);
* screenshot latency (``Page.captureScreenshot``, PNG, through the gateway), p50/p99.

``--provider host``: the host provider (Chromium in a bubblewrap sandbox); every session is
a cold Chromium start, and "straight" is this process holding a sandboxed Chromium's pipe.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dovecote.services.browsers import host  # noqa: E402
from tests.browsers.helpers import api_client  # noqa: E402
from tests.helpers.suite import Suite  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Cdp:
    """A minimal CDP client over any send/receive pair."""

    def __init__(self, send: Any, receive: Any) -> None:
        self.send, self.receive = send, receive
        self.ids = itertools.count(1)

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   session: str | None = None) -> dict[str, Any]:
        msg_id = next(self.ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        await self.send(json.dumps(message))
        while True:
            reply = json.loads(await self.receive())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                result: dict[str, Any] = reply["result"]
                return result

    async def page_session(self) -> str:
        targets = (await self.call("Target.getTargets"))["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        session: str = (await self.call("Target.attachToTarget", {"targetId": page["targetId"],
                                                                  "flatten": True}))["sessionId"]
        return session


async def round_trips(cdp: Cdp, session: str, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = await cdp.call("Runtime.evaluate", {"expression": "1+1", "returnByValue": True}, session)
        samples.append((time.perf_counter() - started) * 1000)
        assert result["result"]["value"] == 2
    return samples


async def through_gateway(connect_url: str, rounds: int, shots: int) -> tuple[list[float], list[float]]:
    async with trio_websocket.open_websocket_url(connect_url, max_message_size=64 * 1024 * 1024) as ws:
        cdp = Cdp(ws.send_message, ws.get_message)
        session = await cdp.page_session()
        await round_trips(cdp, session, 20)  # warm up
        evals = await round_trips(cdp, session, rounds)
        screenshots = []
        for _ in range(shots):
            started = time.perf_counter()
            await cdp.call("Page.captureScreenshot", {"format": "png"}, session)
            screenshots.append((time.perf_counter() - started) * 1000)
    return evals, screenshots


async def straight(rounds: int) -> list[float]:
    conn = await host.launch(host.ensure_user("dovecote-browser"), 1280, 800)
    try:
        async def send(text: str) -> None:
            await conn.send(text.encode())

        cdp = Cdp(send, conn.receive)
        session = await cdp.page_session()
        await round_trips(cdp, session, 20)
        return await round_trips(cdp, session, rounds)
    finally:
        await conn.aclose()


GUEST_CDP = r"""
import base64, json, os, socket, struct, sys, time, urllib.request
port, rounds = int(sys.argv[1]), int(sys.argv[2])
pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
url = next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"]
path = "/" + url.split("://", 1)[1].split("/", 1)[1]
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
buf = buf.split(b"\r\n\r\n", 1)[1]
def need(k):
    global buf
    while len(buf) < k:
        buf += s.recv(65536)
def recv():
    global buf
    need(2)
    n, off = buf[1] & 0x7f, 2
    if n == 126:
        need(4); n, off = struct.unpack(">H", buf[2:4])[0], 4
    elif n == 127:
        need(10); n, off = struct.unpack(">Q", buf[2:10])[0], 10
    need(off + n)
    data, buf = buf[off:off + n], buf[off + n:]
    return json.loads(data)
def send(obj):
    data, mask = json.dumps(obj).encode(), os.urandom(4)
    n = len(data)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
samples = []
for i in range(20 + rounds):
    started = time.perf_counter()
    send({"id": i, "method": "Runtime.evaluate", "params": {"expression": "1+1", "returnByValue": True}})
    while True:
        reply = recv()
        if reply.get("id") == i:
            break
    assert reply["result"]["result"]["value"] == 2
    if i >= 20:
        samples.append((time.perf_counter() - started) * 1000)
print(json.dumps(samples))
"""


def guest_exec(suite: Suite, key: str, capsule_id: str, cmd: list[str], timeout: int = 300) -> str:
    """Run ``cmd`` in the capsule (as its default user) through the capsules API; its stdout."""
    response = httpx.post(f"{suite.url}/v1/capsules/{capsule_id}/exec", headers={"X-API-Key": key},
                          json={"cmd": cmd[0], "args": cmd[1:], "timeout_sec": timeout}, timeout=timeout + 30)
    response.raise_for_status()
    body = response.json()
    if body.get("exit_code") != 0:
        raise RuntimeError(f"{cmd[0]} exited {body.get('exit_code')}: {body.get('stderr', '')[-500:]}")
    return str(body["stdout"])


def cold_start_ms(suite: Suite, key: str, capsule_id: str, n: int) -> list[float]:
    """A second headless Chromium in the VM, fresh profile, timed in the guest until it has a page."""
    from dovecote.vmmgr.templates import chromium_ready, chromium_start

    samples = []
    for i in range(n):
        port, profile = 9333 + i, f"/tmp/cold-profile-{i}"
        script = (f"t0=$(date +%s%N); {chromium_start(port, profile)}; P=$!; "
                  f"until {chromium_ready(port)}; do sleep 0.05; done; t1=$(date +%s%N); "
                  "echo $(( (t1 - t0) / 1000000 )); kill $P 2>/dev/null; true")
        samples.append(float(guest_exec(suite, key, capsule_id, ["sh", "-c", script]).split()[-1]))
        time.sleep(2)
    return samples


def run_vm(args: argparse.Namespace) -> None:
    from tests.helpers.capsules import IMAGE_DIR, libvirt_ready

    reason = libvirt_ready()
    if reason:
        raise SystemExit(f"the VM provider needs libvirt: {reason}")
    root = Path(tempfile.mkdtemp(prefix="dcbenchbrowser-", dir="/tmp"))
    root.chmod(0o755)
    suite = Suite(data_dir=root / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
        "DOVECOTE_VM_BOOT_TIMEOUT_S": "900",
        "DOVECOTE_VM_TEMPLATES": "true",  # the warm pool (it keeps browser spares too)
        "DOVECOTE_BROWSER_TEMPLATE": "true", "DOVECOTE_TEAM_MAX_CAPSULES": "4",
        "DOVECOTE_BROWSER_PROVISION_TIMEOUT_S": "300", "DOVECOTE_SIGNUP_MAX_PER_IP": "1000"})
    try:
        suite.wait_ready()
        (root / "data").chmod(0o755)
        api = api_client(suite, "Bench")
        warm = api.create({})  # the first may wait for the template build: not counted
        api.wait_status(warm, "running", "failed", timeout=3600)
        api.delete(f"/api/sessions/{warm}")
        def create_ms() -> tuple[str, float]:
            started = time.perf_counter()
            session_id = api.create({})
            deadline = time.monotonic() + 600
            while True:
                body = api.get(f"/api/sessions/{session_id}").json()
                if body["status"] == "running":
                    return session_id, (time.perf_counter() - started) * 1000
                if body["status"] != "creating" or time.monotonic() > deadline:
                    raise SystemExit(f"a session failed: {body.get('error')}")
                time.sleep(0.05)

        creates = []
        session_id = ""
        for _ in range(args.sessions):
            time.sleep(args.spare_wait_s)  # vmmgr's warm pool remakes its browser spare
            session_id, ms = create_ms()
            creates.append(ms)
            api.delete(f"/api/sessions/{session_id}")
        time.sleep(args.spare_wait_s)
        claimed, _ = create_ms()
        session_id, plain = create_ms()  # right after: no spare ready, a plain restore
        api.delete(f"/api/sessions/{claimed}")
        t50 = statistics.median(creates)
        print(f"create -> running with the browser template (a warm spare claimed): p50 {t50:.0f} ms, "
              f"max {max(creates):.0f} ms over {len(creates)}")
        print(f"create -> running with the browser template, no spare (a plain restore): {plain:.0f} ms")
        session = api.get(f"/api/sessions/{session_id}").json()
        capsule_id = session["machineId"]
        cold = cold_start_ms(suite, api.key, capsule_id, args.cold)
        c50 = statistics.median(cold)
        print(f"cold Chromium start in the same VM (until DevTools has a page): p50 {c50:.0f} ms, "
              f"max {max(cold):.0f} ms over {len(cold)}")
        print(f"  ratio cold start / template create p50 {c50 / t50:.1f}x (target >= 10x; a lower bound)")
        evals, shots = trio.run(through_gateway, session["connectUrl"], args.rounds, args.screenshots)
        direct = json.loads(guest_exec(suite, api.key, capsule_id,
                                       ["python3", "-c", GUEST_CDP, "9222", str(args.rounds)]))
        report(evals, direct, shots, "straight to the guest (a client in the guest, loopback)")
        print("where create -> running went (the services' logs):")
        for line in suite.output:
            if any(k in line for k in ("browser session running", "browser devtools connected",
                                       "browser spare ready", '"capsule running"')):
                print("  " + line.rstrip()[:400])
    finally:
        suite.stop()
        shutil.rmtree(root, ignore_errors=True)


def report(evals: list[float], direct: list[float], shots: list[float], where: str) -> None:
    g50, g99 = pct(evals, 0.5), pct(evals, 0.99)
    d50, d99 = pct(direct, 0.5), pct(direct, 0.99)
    print(f"CDP Runtime.evaluate(1+1) through the gateway: p50 {g50:.2f} ms, p99 {g99:.2f} ms")
    print(f"CDP Runtime.evaluate(1+1) {where}: p50 {d50:.2f} ms, p99 {d99:.2f} ms")
    print(f"  ratio p50 {g50 / d50:.1f}x, p99 {g99 / d99:.1f}x (target <= 2x)")
    print(f"screenshot (Page.captureScreenshot, through the gateway): p50 {pct(shots, 0.5):.0f} ms, "
          f"p99 {pct(shots, 0.99):.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=("vm", "host"), default="vm")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--spare-wait-s", type=float, default=30.0,
                        help="pause before each VM create (vmmgr remakes its warm browser spare)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--screenshots", type=int, default=20)
    args = parser.parse_args()
    if args.provider == "vm":
        run_vm(args)
        return
    suite = Suite(extra_env={"DOVECOTE_BROWSER_HOST": "true", "DOVECOTE_TEAM_MAX_CAPSULES": "50",
                             "DOVECOTE_SIGNUP_MAX_PER_IP": "1000"})
    try:
        suite.wait_ready()
        api = api_client(suite, "Bench")
        creates = []
        session_id = ""
        for _ in range(args.sessions):
            started = time.perf_counter()
            session_id = api.create({})
            api.wait_status(session_id, "running", timeout=120)
            creates.append((time.perf_counter() - started) * 1000)
            if len(creates) < args.sessions:
                api.delete(f"/api/sessions/{session_id}")
        print(f"create -> running (host provider, cold Chromium): p50 {statistics.median(creates):.0f} ms, "
              f"max {max(creates):.0f} ms over {len(creates)}")
        connect_url = api.get(f"/api/sessions/{session_id}").json()["connectUrl"]
        evals, shots = trio.run(through_gateway, connect_url, args.rounds, args.screenshots)
        direct = trio.run(straight, args.rounds)
        report(evals, direct, shots, "straight to the browser (this process on its pipe)")
        actions = api.get(f"/api/sessions/{session_id}/actions", params={"limit": 1}).json()["total"]
        print(f"(actions logged for the gateway session: {actions})")
        httpx.get(suite.url + "/healthz", timeout=10)
    finally:
        suite.stop()


if __name__ == "__main__":
    main()
