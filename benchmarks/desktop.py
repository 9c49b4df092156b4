"""Desktop session benchmarks: create → runtime_ready, action → receipt, screenshots.

Run: ``.venv/bin/python benchmarks/desktop.py [--creates 5] [--actions 30]``.
Starts its own ``dovecote up`` with the xvfb provider on and prints, per provider:

* session create → ``runtime_ready`` p50 (for qemu: restored from the desktop
  template, next to a cold boot of the same image), with the time of each rung
  of the ladder; for qemu each create comes ``--spare-wait-s`` after the last
  (vmmgr's warm pool remakes its desktop spare in the background), then two
  back to back, the second a plain restore (no spare ready);
* action → receipt p50/p99 through the API for ``mouse_click``, ``type_text``
  and ``run_command``, next to the same command run straight through a guest
  agent in a sandbox of its own (the bridge without the gateway, bus and
  service), and their ratio; for qemu each API action is followed (untimed)
  by a GET of the session, which waits for the action's recording (run after
  the receipt), then ``run_command`` back to back without it (each action
  waits for the last one's screenshot);
* screenshot latency p50/p99 (``GET /api/sessions/{id}/screenshot``).

The qemu provider runs in a second ``dovecote up`` with the libvirt driver and
``DOVECOTE_DESKTOP_TEMPLATE=true`` (the first run on a host builds the desktop
image and template); its baseline is a cold boot of the desktop image by the
driver straight (``--qemu-only`` measures only this part), whose guest agent
then runs the same commands directly, sample by sample in turn with the API's
(the machine is shared: side by side, both see the same load).
``--skip-qemu`` measures the xvfb provider only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dovecote.bus.messages import desktops as d  # noqa: E402
from dovecote.services.desktops import actions as A  # noqa: E402
from dovecote.services.desktops import xvfb  # noqa: E402
from dovecote.services.desktops.qemu import size_script  # noqa: E402
from dovecote.vmmgr.guest.client import open_agent  # noqa: E402
from tests.desktops.helpers import api_client  # noqa: E402
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
    parser.add_argument("--skip-qemu", action="store_true", help="the xvfb provider only")
    parser.add_argument("--qemu-only", action="store_true", help="the qemu provider only")
    parser.add_argument("--spare-wait-s", type=float, default=20.0,
                        help="pause before each qemu create (vmmgr remakes its warm desktop spare)")
    args = parser.parse_args()
    if args.qemu_only:
        qemu_benchmark(args)
        return 0
    root = Path(tempfile.mkdtemp(prefix="dcbench-", dir="/var/tmp"))
    root.chmod(0o755)
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_DESKTOP_XVFB": "true",
                             "DOVECOTE_DESKTOP_XVFB_ROOT": str(root / "runtime"),
                             "DOVECOTE_LOG_LEVEL": "warning"})
    try:
        suite.wait_ready()
        api = api_client(suite, "Bench")
        health = api.get("/api/health").json()
        print("desktop sessions benchmark")
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
        del health
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
    if not args.skip_qemu:
        qemu_benchmark(args)
    return 0


QEMU_ACTIONS: dict[str, dict[str, Any]] = {
    "mouse_click": {"kind": "mouse_click", "x": 700, "y": 450},
    "type_text": {"kind": "type_text", "text": "hello"},
    "run_command": {"kind": "run_command", "command": "true"},
}


def qemu_benchmark(args: argparse.Namespace) -> None:
    """The qemu provider: template restores through the API next to a cold boot of the image,
    and actions through the API interleaved, sample by sample, with the same commands run
    straight through the cold-booted VM's guest agent (the machine is shared: measured side
    by side, both see the same load)."""
    trio.run(_qemu_benchmark, args)


async def _qemu_benchmark(args: argparse.Namespace) -> None:
    from dovecote.vmmgr.accel import Accel
    from dovecote.vmmgr.driver import VmSpec
    from dovecote.vmmgr.emulator import install_wrapper
    from dovecote.vmmgr.images import DESKTOP_BUILDER, ensure_guest_image
    from dovecote.vmmgr.libvirt_driver import open_libvirt_driver
    from dovecote.vmmgr.templates import DESKTOP_MEMORY_MB, DESKTOP_READY, DESKTOP_VCPUS
    from tests.helpers.capsules import IMAGE_DIR

    print("qemu (a QEMU desktop VM under TCG):")
    image_dir = Path(IMAGE_DIR)
    image = await ensure_guest_image(image_dir, builder=DESKTOP_BUILDER)
    emulator = install_wrapper(image_dir)
    work = Path(tempfile.mkdtemp(prefix="dccold-", dir="/tmp"))
    os.chmod(work, 0o755)
    spec = VmSpec.in_dir("bench-cold-" + uuid.uuid4().hex[:8], work, image=image,
                         vcpus=DESKTOP_VCPUS, memory_mib=DESKTOP_MEMORY_MB)
    async with open_libvirt_driver(accel=Accel.TCG, emulator=emulator) as driver:
        began = time.perf_counter()
        await driver.create(spec)
        try:
            with trio.fail_after(900):
                async with open_agent(str(spec.agent_socket_path), connect_timeout=900) as agent:
                    while True:  # polling the guest until its desktop is up
                        if not (await agent.exec(["sh", "-c", DESKTOP_READY], timeout=120)).exit_code:
                            break
                        await trio.sleep(0.5)
                    cold_s = time.perf_counter() - began
                    size = await agent.exec(["sh", "-c", size_script(1440, 900)], user="dove", timeout=60)
                    assert size.stdout.strip() == "1440x900", size
                    await trio.to_thread.run_sync(_through_api, args, agent, cold_s, trio.from_thread.run)
        finally:
            with trio.CancelScope(shield=True):
                await driver.destroy(spec.capsule_id)
                shutil.rmtree(work, ignore_errors=True)


def _through_api(args: argparse.Namespace, agent: Any, cold_s: float, from_trio: Any) -> None:
    from tests.helpers.capsules import IMAGE_DIR

    root = Path(tempfile.mkdtemp(prefix="dcqbench-", dir="/tmp"))
    root.chmod(0o755)
    suite = Suite(data_dir=root / "data", extra_env={
        "DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_VM_DRIVER": "libvirt",
        "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR, "DOVECOTE_VM_TEMPLATES": "true",  # the warm pool
        "DOVECOTE_VM_POOL_SIZE": "1",
        "DOVECOTE_DESKTOP_TEMPLATE": "true", "DOVECOTE_LOG_LEVEL": "warning"})
    try:
        suite.wait_ready()
        (root / "data").chmod(0o755)
        api = api_client(suite, "Bench")
        deadline = time.monotonic() + 2400
        while api.get("/api/health").json()["providers"]["qemu"]["status"] != "ok":
            assert time.monotonic() < deadline, "the desktop template was not built in time"
            time.sleep(5)
        creates: list[float] = []
        rungs: dict[str, list[float]] = {}
        session_id = ""
        for i in range(args.creates):
            time.sleep(args.spare_wait_s)  # vmmgr makes its next desktop spare meanwhile
            began = time.perf_counter()
            response = api.post("/api/sessions", {})
            assert response.status_code == 201, response.text
            sid = response.json()["session"]["id"]
            while True:
                session = api.get(f"/api/sessions/{sid}").json()["session"]
                if session["readiness_state"] in ("runtime_ready", "failed"):
                    break
                time.sleep(0.05)
            assert session["readiness_state"] == "runtime_ready", session
            creates.append(time.perf_counter() - began)
            history = session["readiness_history"]
            for before, after in itertools.pairwise(history):
                rungs.setdefault(after["state"], []).append(_seconds(after["at"]) - _seconds(before["at"]))
            if i < args.creates - 1:
                api.delete(f"/api/sessions/{sid}")
            else:
                session_id = sid
        print(line("create -> runtime_ready (template)", creates))
        print(f"  {'cold boot of the same image':<34} {cold_s * 1000:8.1f} ms   "
              f"(restore is {cold_s / statistics.median(creates):.1f}x faster; target >= 20x)")
        for state, values in rungs.items():  # where the time goes (the rungs' timestamps)
            print(line(f"  ... -> {state}", values))
        # Two creates back to back: the second finds no warm spare (the pool is remaking it)
        # and is a plain restore of the template.
        time.sleep(args.spare_wait_s)
        pair = [api.post("/api/sessions", {}).json()["session"]["id"]]
        began = time.perf_counter()
        pair.append(api.post("/api/sessions", {}).json()["session"]["id"])
        while True:
            session = api.get(f"/api/sessions/{pair[1]}").json()["session"]
            if session["readiness_state"] in ("runtime_ready", "failed"):
                break
            time.sleep(0.05)
        assert session["readiness_state"] == "runtime_ready", session
        plain_s = time.perf_counter() - began
        print(f"  {'create -> runtime_ready, no spare':<34} {plain_s * 1000:8.1f} ms   "
              f"(a restore with a busy host; {cold_s / plain_s:.1f}x faster than the cold boot)")
        for sid in pair:
            api.delete(f"/api/sessions/{sid}")
        through: dict[str, list[float]] = {}
        direct: dict[str, list[float]] = {}
        for name, body in QEMU_ACTIONS.items():
            action = d.action_decoder.decode(json.dumps(body).encode())
            command = A.command_for(action)
            argv: str | list[str] = command.argv if command else body["command"]

            async def straight(argv: str | list[str] = argv) -> float:
                t = time.perf_counter()
                result = await agent.exec(argv, user="dove", timeout=30)
                assert result.exit_code == 0, result
                return time.perf_counter() - t

            through[name], direct[name] = [], []
            for i in range(args.actions + 3):  # three rounds of warm-up, then one of each in turn
                began = time.perf_counter()
                receipt = api.act(session_id, body)
                api_s = time.perf_counter() - began
                assert receipt["status"] == "ok", receipt
                # The action's recording (a host screenshot, the timeline entry) runs after its
                # receipt; a GET of the session waits for it, so it does not load the straight
                # sample nor delay the next action (its screen must be captured first).
                api.get(f"/api/sessions/{session_id}")
                agent_s = from_trio(straight)
                if i >= 3:
                    through[name].append(api_s)
                    direct[name].append(agent_s)
        back_to_back = []  # no GET between: each action first waits for the last one's screenshot
        for _ in range(args.actions):
            began = time.perf_counter()
            api.act(session_id, QEMU_ACTIONS["run_command"])
            back_to_back.append(time.perf_counter() - began)
        shots = []
        for _ in range(args.actions):
            began = time.perf_counter()
            response = api.get(f"/api/sessions/{session_id}/screenshot")
            shots.append(time.perf_counter() - began)
            assert response.status_code == 200
        api.delete(f"/api/sessions/{session_id}")
        for name in QEMU_ACTIONS:
            print(line(f"{name} -> receipt (API)", through[name]))
            print(line(f"{name} straight through the agent", direct[name]))
            ratio = statistics.median(through[name]) / statistics.median(direct[name])
            print(f"  {name} API/agent p50 ratio {ratio:.2f} (target <= 1.5)")
        print(line("run_command back to back (API)", back_to_back))
        print(line("screenshot (from the host)", shots))
    finally:
        suite.stop()
        shutil.rmtree(root, ignore_errors=True)

def _seconds(stamp: str) -> float:
    """An RFC 3339 timestamp of the readiness history as seconds since the epoch."""
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    sys.exit(main())
