"""Agent runs benchmarks: planner step overhead and event fan-out to SSE clients.

Run: ``.venv/bin/python benchmarks/runs.py [--instructions 4] [--steps 15] [--clients 10]``.
Starts its own ``dovecote up`` on the **xvfb** desktop provider (a QEMU
desktop under TCG would measure the emulator: each screenshot and xdotool
call costs a guest round trip many times slower than on hardware) and a local
OpenAI-compatible model double that answers at once.

* **Planner step overhead**: a live session's planner gets ``--steps``
  ``computer`` tool calls (``mouse_move``) per instruction. The model double
  stamps when it finished sending an answer and when the next request
  arrived; the gap is the step's overhead outside the model: parsing the tool
  call, the ``tool_call`` / ``computer_action`` / ``tool_result`` /
  ``screenshot`` events (stored and streamed), the ``desktops.action`` bus
  request and its receipt, the screenshot after it, and building the next
  model call. The model's own time is excluded by construction. Target: p50
  ≤ 50 ms.
* **Event fan-out**: ``--clients`` SSE readers of the session's
  ``/api/live-sessions/:id/events`` while those steps run; for each event and
  reader, the time from the event's insert (its ``at``) to the reader having
  its ``data:`` line. Target: p50 ≤ 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.suite import Suite  # noqa: E402
from tests.runs.helpers import api_client  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def line(label: str, values: list[float], target: str = "") -> str:
    return (f"  {label:<40} p50 {pct(values, 0.5):8.1f} ms   p99 {pct(values, 0.99):8.1f} ms"
            f"   (n={len(values)}){'   target ' + target if target else ''}")


class Model(BaseHTTPRequestHandler):
    """Answers ``steps`` mouse_move calls, then ``done``; stamps answer-sent and next-request times."""

    steps = 15
    lock = threading.Lock()
    answered_at: float | None = None
    gaps: list[float] = []
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def log_message(self, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        self._send({"data": [{"id": "bench-model"}]})

    def do_POST(self) -> None:
        arrived = time.perf_counter()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        done_tools = sum(1 for m in body["messages"] if m["role"] == "tool")
        with Model.lock:
            if done_tools and Model.answered_at is not None:
                Model.gaps.append(arrived - Model.answered_at)
        if done_tools < Model.steps:
            x = 10 + (done_tools * 37) % 900
            call = {"name": "computer", "arguments": json.dumps({"action": "mouse_move", "x": x, "y": 300})}
        else:
            call = {"name": "done", "arguments": json.dumps({"summary": f"{done_tools} steps"})}
        self._send({"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{done_tools}", "type": "function", "function": call}]}}], "usage": {"total_tokens": 1}})
        with Model.lock:
            Model.answered_at = None if done_tools >= Model.steps else time.perf_counter()

    def _send(self, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


def at_epoch(at: str) -> float:
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def reader(url: str, key: str, sid: str, out: list[float], stop: threading.Event,
           ready: threading.Event) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=httpx.Timeout(60, read=30)) as http:
        with http.stream("GET", f"/api/live-sessions/{sid}/events") as response:
            ready.set()
            for text in response.iter_lines():
                now = time.time()
                if text.startswith("data: "):
                    event = json.loads(text[6:])
                    if stop.is_set():
                        return
                    out.append(now - at_epoch(event["at"]))


def action_baseline(api: Any, count: int) -> list[float]:
    """The same ``mouse_move`` straight through ``POST /api/sessions/{id}/actions`` of a desktop session."""
    created = api.post("/api/sessions", {"provider": "xvfb", "width": 1024, "height": 768})
    assert created.status_code == 201, created.text
    sid = created.json()["session"]["id"]
    deadline = time.monotonic() + 60
    while api.get(f"/api/sessions/{sid}").json()["session"]["readiness_state"] != "runtime_ready":
        assert time.monotonic() < deadline, "the baseline desktop session never became ready"
        time.sleep(0.2)
    out = []
    for index in range(count):
        began = time.perf_counter()
        done = api.post(f"/api/sessions/{sid}/actions", {"kind": "mouse_move", "x": 10 + index, "y": 300})
        out.append(time.perf_counter() - began)
        assert done.status_code == 200 and done.json()["status"] == "ok", done.text
    api.http.delete(f"/api/sessions/{sid}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instructions", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15, help="tool calls per instruction (at most 19)")
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    Model.steps = min(19, args.steps)
    missing = [t for t in ("bwrap", "Xvfb", "xdotool", "openbox") if shutil.which(t) is None]
    if missing:
        print(f"missing {missing}: run infra/system-deps.sh")
        return 2
    server = ThreadingHTTPServer(("127.0.0.1", 0), Model)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = Path(tempfile.mkdtemp(prefix="dcbenchruns-", dir="/var/tmp"))
    root.chmod(0o755)
    suite = Suite(extra_env={
        "DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_DESKTOP_XVFB": "true",
        "DOVECOTE_DESKTOP_XVFB_ROOT": str(root / "runtime"), "DOVECOTE_RUNS_DESKTOP_PROVIDER": "xvfb",
        "DOVECOTE_MODEL_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}/v1",
        "DOVECOTE_MODEL": "bench-model", "DOVECOTE_LOG_LEVEL": "warning"})
    try:
        suite.wait_ready()
        api = api_client(suite, "Bench")
        created = api.post("/api/live-sessions", {"model": "bench-model"})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        deadline = time.monotonic() + 120
        while api.get(f"/api/live-sessions/{sid}").json()["session"]["status"] != "idle":
            assert time.monotonic() < deadline, "the live session never became idle"
            time.sleep(0.2)
        latencies: list[list[float]] = [[] for _ in range(args.clients)]
        stop = threading.Event()
        readies = [threading.Event() for _ in range(args.clients)]
        threads = [threading.Thread(target=reader, args=(suite.url, api.key, sid, out, stop, ready),
                                    daemon=True) for out, ready in zip(latencies, readies, strict=True)]
        for thread in threads:
            thread.start()
        for ready in readies:
            ready.wait(30)
        time.sleep(2.0)  # the history has been replayed to every reader
        for out in latencies:
            out.clear()
        print("agent runs benchmark (xvfb desktop provider, local model double)")
        began = time.monotonic()
        for index in range(args.instructions):
            sent = api.post(f"/api/live-sessions/{sid}/commands", {"instruction": f"move around {index}"})
            assert sent.status_code == 202, sent.text
            deadline = time.monotonic() + 300
            while True:
                session = api.get(f"/api/live-sessions/{sid}").json()["session"]
                if session["status"] in ("idle", "error"):
                    break
                assert time.monotonic() < deadline, "an instruction did not finish"
                time.sleep(0.1)
            assert session["status"] == "idle", session
        took = time.monotonic() - began
        time.sleep(1.0)
        stop.set()
        fanout = [v for out in latencies for v in out]
        steps = list(Model.gaps)
        print(f"  {args.instructions} instructions x {Model.steps} tool calls in {took:.1f} s "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        print(line("planner step overhead (outside the model)", steps, "p50 <= 50 ms"))
        if args.clients:
            print(line(f"event fan-out to {args.clients} SSE clients", fanout, "p50 <= 20 ms"))
        baseline = action_baseline(api, len(steps))
        print(line("baseline: mouse_move -> receipt (API)", baseline))
        print(f"  the runs service's own share of a step p50 ~ {pct(steps, 0.5) - pct(baseline, 0.5):.1f} ms")
        ok = steps and pct(steps, 0.5) <= 50 and (not args.clients or pct(fanout, 0.5) <= 20)
        print("  targets met" if ok else "  TARGETS NOT MET")
        return 0
    finally:
        suite.stop()
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
