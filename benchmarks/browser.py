"""Browser session benchmarks: create → running, CDP round trips, screenshots.

Run: ``.venv/bin/python benchmarks/browser.py [--sessions 5] [--rounds 300]`` (about a minute,
as root or a user that may run bubblewrap). Starts its own ``dovecote up`` with the host
provider (``DOVECOTE_BROWSER_HOST=true``: Chromium in a bubblewrap sandbox), signs up a
user, and prints:

* create → ``running`` p50/max over ``--sessions`` sessions (``POST`` until ``GET`` says
  ``running``). On the host provider every session is a cold Chromium start; the VM
  browser template (a restore) is not built yet, so the template-vs-cold ratio the issue
  asks for is not measured here;
* CDP round trip (``Runtime.evaluate`` of ``1+1`` on a page, p50/p99) through the gateway's
  WebSocket (gateway → bus stream → browsers service → relay → Chromium's pipe) against
  straight to a browser (this process holding a sandboxed Chromium's DevTools pipe: the
  floor, no gateway, bus or relay);
* screenshot latency (``Page.captureScreenshot``, PNG, through the gateway), p50/p99.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--screenshots", type=int, default=20)
    args = parser.parse_args()
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
        print("create -> running with the VM browser template: not measured (the template is not built)")
        connect_url = api.get(f"/api/sessions/{session_id}").json()["connectUrl"]
        evals, shots = trio.run(through_gateway, connect_url, args.rounds, args.screenshots)
        direct = trio.run(straight, args.rounds)
        g50, g99 = pct(evals, 0.5), pct(evals, 0.99)
        d50, d99 = pct(direct, 0.5), pct(direct, 0.99)
        print(f"CDP Runtime.evaluate(1+1) through the gateway: p50 {g50:.2f} ms, p99 {g99:.2f} ms")
        print(f"CDP Runtime.evaluate(1+1) straight to the browser: p50 {d50:.2f} ms, p99 {d99:.2f} ms")
        print(f"  ratio p50 {g50 / d50:.1f}x (target <= 2x)")
        print(f"screenshot (Page.captureScreenshot, through the gateway): p50 {pct(shots, 0.5):.0f} ms, "
              f"p99 {pct(shots, 0.99):.0f} ms")
        actions = api.get(f"/api/sessions/{session_id}/actions", params={"limit": 1}).json()["total"]
        print(f"(actions logged for the gateway session: {actions})")
        httpx.get(suite.url + "/healthz", timeout=10)
    finally:
        suite.stop()


if __name__ == "__main__":
    main()
