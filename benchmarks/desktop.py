"""Desktop session benchmarks: create → runtime_ready, action → receipt, screenshots.

Run: ``.venv/bin/python benchmarks/desktop.py [--creates 5] [--actions 30]``.
Starts its own ``dovecote up`` with the xvfb provider on and prints, per provider:

* session create → ``runtime_ready`` p50 (for qemu: restored from the desktop
  template, next to a cold boot of the same image);
* action → receipt p50/p99 through the API for ``mouse_click``, ``type_text``
  and ``run_command``, next to the same command run straight through a guest
  agent in a sandbox of its own (the bridge without the gateway, bus and
  service), and their ratio;
* screenshot latency p50/p99 (``GET /api/sessions/{id}/screenshot``).

The qemu provider needs the desktop template; when ``/api/health`` says it is
unavailable, its lines say so instead of printing numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dovecote.bus.messages import desktops as d  # noqa: E402
from dovecote.services.desktops import actions as A  # noqa: E402
from dovecote.services.desktops import xvfb  # noqa: E402
from dovecote.vmmgr.guest.client import open_agent  # noqa: E402
from tests.desktops.test_xvfb_api import api_client  # noqa: E402
from tests.helpers.suite import Suite  # noqa: E402

ACTIONS: dict[str, dict[str, Any]] = {
    "mouse_click": {"kind": "mouse_click", "x": 100, "y": 100},
    "type_text": {"kind": "type_text", "text": "hello"},
    "run_command": {"kind": "run_command", "command": "true"},
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def line(label: str, values: list[float]) -> str:
    return (f"  {label:<34} p50 {pct(values, 0.5):8.1f} ms   p99 {pct(values, 0.99):8.1f} ms"
            f"   (n={len(values)})")


def direct_baseline(root: Path, count: int) -> dict[str, list[float]]:
    """The same commands straight through a guest agent in a sandbox of its own."""

    async def run() -> dict[str, list[float]]:
        lib = xvfb.install_lib(root)
        spec = xvfb.SandboxSpec(session_dir=root / "direct", lib_dir=lib, user=xvfb.ensure_user(
            "dovecote-desktop"), desktop_user="dove", desktop_home="/home/dove",
            desktop_runtime_dir="/tmp/runtime-dove", width=1024, height=768, window_manager="openbox",
            bridge=True)
        xvfb.prepare(spec)
        out: dict[str, list[float]] = {}
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(partial(trio.run_process, xvfb.argv(spec), check=False))
            with trio.fail_after(30):
                while not (spec.bridge_dir / "agent.sock").exists():  # noqa: ASYNC110 - a file appears
                    await trio.sleep(0.05)
            async with open_agent(str(spec.bridge_dir / "agent.sock"), connect_timeout=10) as agent:
                bridge = xvfb.XvfbBridge(agent, spec)
                for name, body in ACTIONS.items():
                    action = d.action_decoder.decode(__import__("json").dumps(body).encode())
                    command = A.command_for(action)
                    argv: str | list[str] = command.argv if command else body["command"]
                    samples = []
                    for _ in range(count):
                        began = time.perf_counter()
                        await bridge.exec(argv, timeout=30)
                        samples.append(time.perf_counter() - began)
                    out[name] = samples
            proc.kill()
            nursery.cancel_scope.cancel()
        return out

    return trio.run(run)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--creates", type=int, default=5)
    parser.add_argument("--actions", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dcbench-", dir="/var/tmp"))
    root.chmod(0o755)
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_DESKTOP_XVFB": "true",
                             "DOVECOTE_DESKTOP_XVFB_ROOT": str(root / "runtime"),
                             "DOVECOTE_LOG_LEVEL": "warning"})
    try:
        suite.wait_ready()
        api = api_client(suite, "Bench")
        health = api.get("/api/health").json()
        print("desktop sessions benchmark (xvfb provider; qemu needs the desktop template)")
        creates: list[float] = []
        session_id = ""
        for i in range(args.creates):
            began = time.perf_counter()
            response = api.post("/api/sessions", {"provider": "xvfb", "width": 1024, "height": 768})
            assert response.status_code == 201, response.text
            session = response.json()["session"]
            assert session["readiness_state"] == "runtime_ready", session
            creates.append(time.perf_counter() - began)
            if i < args.creates - 1:
                api.delete(f"/api/sessions/{session['id']}")
            else:
                session_id = session["id"]
        print("xvfb:")
        print(line("create -> runtime_ready", creates))
        api.act(session_id, {"kind": "open_app", "name": "xterm"})
        time.sleep(1)
        through: dict[str, list[float]] = {}
        for name, body in ACTIONS.items():
            samples = []
            for _ in range(args.actions):
                began = time.perf_counter()
                receipt = api.act(session_id, body)
                samples.append(time.perf_counter() - began)
                assert receipt["status"] == "ok", receipt
            through[name] = samples
        shots = []
        for _ in range(args.actions):
            began = time.perf_counter()
            response = api.get(f"/api/sessions/{session_id}/screenshot")
            shots.append(time.perf_counter() - began)
            assert response.status_code == 200
        api.delete(f"/api/sessions/{session_id}")
        direct = direct_baseline(root / "runtime", args.actions)
        for name in ACTIONS:
            print(line(f"{name} -> receipt (API)", through[name]))
            print(line(f"{name} straight through the agent", direct[name]))
            ratio = statistics.median(through[name]) / statistics.median(direct[name])
            print(f"  {name} API/agent p50 ratio {ratio:.2f} (target <= 1.5)")
        print(line("screenshot", shots))
        qemu = health["providers"].get("qemu", {})
        print("qemu:")
        if qemu.get("status") != "ok":
            print(f"  unavailable: {qemu.get('reason')}; no template restore or cold boot measured")
    except BaseException:
        import json as _json

        for text in suite.output:
            if '"desktops"' in text and '"exc"' in text:
                print(_json.loads(text)["exc"][-3000:])
        raise
    finally:
        suite.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
