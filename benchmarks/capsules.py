"""Capsule benchmarks on a real VM: boot, exec round trip, upload throughput.

Run: ``.venv/bin/python benchmarks/capsules.py [--upload-mb 50] [--execs 20]``.
Starts its own ``dovecote up`` (libvirt driver, the shared guest image cache
``DOVECOTE_TEST_IMAGE_DIR``), creates one ``minimal`` capsule and prints:

* cold boot to agent-ready (create → ``running``, seconds);
* exec round trip of ``true``: through the gateway (HTTP → bus → vmmgr →
  agent) vs straight to the guest agent, and their ratio;
* file upload throughput through the gateway's streaming route vs a local
  file copy, and their ratio.

``--creates N`` measures only API creates (``POST /v1/capsules`` until ``GET`` says
``running``, polled every 10 ms) with a warm spare: N of ``minimal``, then of a team
snapshot template (two creates without a spare, then N claiming a team spare,
``DOVECOTE_VM_TEAM_SPARES``), each with vmmgr's own breakdown of where the time went
(the ``steps_ms`` of its ``capsule running`` log line). ``--pool-size 0`` measures the
``minimal`` creates without a warm spare: with ``--prestarted N`` (``DOVECOTE_VM_PRESTARTED``)
each waits for a pre-started QEMU and claims it; with ``--prestarted 0`` each restores
the template the whole way (libvirt's ``createXML`` on the path).

QEMU's agent socket takes one client at a time and vmmgr holds it, so the
direct measurement SIGKILLs vmmgr first (libvirt keeps the VM; ``dovecote up``
restarts vmmgr, which reconnects on first use).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.capsules import (  # noqa: E402
    IMAGE_DIR,
    Api,
    api_client,
    libvirt_ready,
    wait_status,
)
from tests.helpers.suite import Suite  # noqa: E402

MiB = 1024 * 1024


def _blocks(total: int) -> Iterator[bytes]:
    block = os.urandom(MiB)
    for _ in range(total // MiB):
        yield block


def _multipart(path: str, total: int, boundary: str = "bench-boundary") -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n").encode()
    yield from _blocks(total)
    yield f"\r\n--{boundary}--\r\n".encode()


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def _direct(socket_path: str, n: int, size: int) -> tuple[list[float], float]:
    """Exec round trips and one upload of ``size`` bytes straight to the guest agent."""
    from dovecote.vmmgr.guest import open_agent

    samples: list[float] = []
    async with open_agent(socket_path, connect_timeout=60) as agent:
        await agent.exec("true")
        for _ in range(n):
            began = time.perf_counter()
            await agent.exec("true")
            samples.append(time.perf_counter() - began)

        async def chunks() -> AsyncIterator[bytes]:
            for block in _blocks(size):
                yield block

        began = time.perf_counter()
        await agent.write_file("/root/bench-direct.bin", chunks(), chunk_size=256 * 1024)
        upload_s = time.perf_counter() - began
    return samples, upload_s


def _vmmgr(suite: Suite) -> dict[str, str]:
    details: dict[str, str] = httpx.get(suite.url + "/healthz").json()["services"]["vmmgr"]["details"]
    return details


def _steps_of(suite: Suite, capsule_id: str, timeout: float = 5.0) -> dict[str, float]:
    """vmmgr's breakdown of a create (``steps_ms`` of its ``capsule running`` log line)."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in reversed(suite.output[-400:]):
            if capsule_id in line and '"capsule running"' in line:
                try:
                    return dict(json.loads(line[line.index("{"):]).get("steps_ms") or {})
                except ValueError:
                    return {}
        time.sleep(0.05)
    return {}


def wait_spares(suite: Suite, key: str, at_least: int, timeout: float = 600) -> None:
    """Until vmmgr's health says ``key`` (``spares``, ``team_spares``) is at least ``at_least``."""
    deadline = time.monotonic() + timeout
    while True:
        details = _vmmgr(suite)
        if details.get("template") == "ready" and int(details.get(key, "0")) >= at_least:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"vmmgr never had {at_least} {key}: {details}")
        time.sleep(0.2)


@dataclass
class Creates:
    """API creates one at a time: seconds to ``running``, the POST alone, vmmgr's steps."""

    total: list[float] = field(default_factory=list)
    post: list[float] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)

    def report(self, label: str) -> str:
        if not self.total:
            return f"{label}: no samples"
        names: list[str] = []
        for one in self.steps:
            names.extend(n for n in one if n not in names)
        parts = ", ".join(f"{n} {statistics.median(s.get(n, 0.0) for s in self.steps):.0f}"
                          for n in names)
        return (f"{label}: p50 {_median_ms(self.total):.0f} ms (min {min(self.total) * 1000:.0f}, "
                f"max {max(self.total) * 1000:.0f}, n={len(self.total)}); the POST alone p50 "
                f"{_median_ms(self.post):.0f} ms; vmmgr's steps p50 (ms): {parts or 'none logged'}")


def api_creates(suite: Suite, api: Api, count: int, body: dict[str, object], *,
                spare_key: str | None = None, poll_s: float = 0.01) -> Creates:
    """``count`` creates of ``body`` through the API, each until ``GET`` says ``running``
    (polled every ``poll_s``), then destroyed; with ``spare_key`` each waits first for
    vmmgr's health to show a spare of that kind."""
    out = Creates()
    for _ in range(count):
        if spare_key:
            wait_spares(suite, spare_key, 1)
        began = time.monotonic()
        created = api.post("/v1/capsules", body)
        out.post.append(time.monotonic() - began)
        assert created.status_code == 202, created.text
        capsule_id = created.json()["id"]
        while api.get(f"/v1/capsules/{capsule_id}").json()["status"] != "running":
            if time.monotonic() - began > 600:
                raise RuntimeError(f"capsule {capsule_id} never ran")
            time.sleep(poll_s)
        out.total.append(time.monotonic() - began)
        out.steps.append(_steps_of(suite, capsule_id))
        api.delete(f"/v1/capsules/{capsule_id}")
        wait_status(api, capsule_id, "stopped", timeout=120)
    return out


def bench_creates(count: int, team_spares: int, pool_size: int = 1, prestarted: int | None = None) -> int:
    """API create with a warm spare (or without: ``pool_size`` 0, ``prestarted`` pre-started
    QEMUs): of ``minimal``, and of a team snapshot template."""
    top = Path(tempfile.mkdtemp(prefix="dccreate-", dir="/tmp"))
    top.chmod(0o755)
    suite = Suite(data_dir=top / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
        "DOVECOTE_VM_POOL_SIZE": str(pool_size), "DOVECOTE_VM_TEAM_SPARES": str(team_spares),
        **({"DOVECOTE_VM_PRESTARTED": str(prestarted)} if prestarted is not None else {})})
    key = "spares" if pool_size else "prestarted" if prestarted else None
    label = ("with a spare" if pool_size else f"without a spare, {prestarted} pre-started QEMU"
             if prestarted else "without a spare, nothing pre-started")
    try:
        suite.wait_ready()
        (top / "data").chmod(0o755)
        api = api_client(suite, "Bench")
        wait_spares(suite, key or "spares", 1 if key else 0)
        load = os.getloadavg()[0]
        minimal = api_creates(suite, api, count, {}, spare_key=key)
        print(minimal.report(f"create of minimal {label}"))
        details = _vmmgr(suite)
        print(f"vmmgr's claims: spare_claims {details.get('spare_claims', '0')}, "
              f"prestarted_claims {details.get('prestarted_claims', '0')}")
        created = api.post("/v1/capsules", {})
        assert created.status_code == 202, created.text
        source_id = created.json()["id"]
        wait_status(api, source_id, "running")
        made = api.post("/v1/snapshots", {"sandbox_id": source_id, "name": "bench-tpl"}, timeout=600)
        assert made.status_code == 201, made.text
        api.delete(f"/v1/capsules/{source_id}")
        wait_status(api, source_id, "stopped", timeout=120)
        cold = api_creates(suite, api, 2, {"template": "bench-tpl"})
        print(cold.report("create of a team template, no spare (its first creates)"))
        if team_spares:
            warm = api_creates(suite, api, count, {"template": "bench-tpl"}, spare_key="team_spares")
            print(warm.report("create of a team template with a team spare"))
            ratio = statistics.median(warm.total) / statistics.median(minimal.total)
            print(f"team template with a spare / minimal {label}: {ratio:.2f}x")
        print(f"load average at the start: {load:.1f} (now {os.getloadavg()[0]:.1f})")
        return 0
    finally:
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upload-mb", type=int, default=50)
    parser.add_argument("--execs", type=int, default=20)
    parser.add_argument("--creates", type=int, default=0,
                        help="only measure API creates with a warm spare, this many of each kind")
    parser.add_argument("--pool-size", type=int, default=1,
                        help="DOVECOTE_VM_POOL_SIZE for --creates (default 1; 0: creates without a spare)")
    parser.add_argument("--prestarted", type=int, default=None,
                        help="DOVECOTE_VM_PRESTARTED for --creates (default: vmmgr's)")
    parser.add_argument("--team-spares", type=int, default=2,
                        help="DOVECOTE_VM_TEAM_SPARES for --creates (default 2; 0: none)")
    args = parser.parse_args()
    reason = libvirt_ready()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    if args.creates:
        return bench_creates(args.creates, args.team_spares, args.pool_size, args.prestarted)
    top = Path(tempfile.mkdtemp(prefix="dcbench-", dir="/tmp"))
    top.chmod(0o755)
    data = top / "data"
    suite = Suite(data_dir=data, extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
        "DOVECOTE_MAX_UPLOAD_BYTES": str((args.upload_mb + 1) * MiB)})
    capsule_id = ""
    api = None
    try:
        suite.wait_ready()
        data.chmod(0o755)
        api = api_client(suite, "Bench")
        while True:  # the image may still be building
            response = api.post("/v1/capsules", {"template": "minimal", "vcpus": 1, "memory_mb": 512})
            if response.status_code != 503:
                break
            time.sleep(2)
        assert response.status_code == 202, response.text
        began = time.monotonic()
        capsule_id = response.json()["id"]
        wait_status(api, capsule_id, "running")
        boot_s = time.monotonic() - began
        template = httpx.get(suite.url + "/healthz").json()["services"]["vmmgr"]["details"].get("template")
        how = ("restored from the built-in template" if template == "ready"
               else "cold boot (template not ready)")
        print(f"create of minimal to running: {boot_s:.1f} s ({how})")

        base = f"/v1/capsules/{capsule_id}"
        api.post(f"{base}/exec", {"cmd": "true"})
        gateway: list[float] = []
        for _ in range(args.execs):
            t0 = time.perf_counter()
            reply = api.post(f"{base}/exec", {"cmd": "true"})
            gateway.append(time.perf_counter() - t0)
            assert reply.status_code == 200, reply.text

        size = args.upload_mb * MiB
        t0 = time.perf_counter()
        up = api.post(f"{base}/files/stream/write", content=_multipart("/root/bench.bin", size),
                      headers={"Content-Type": "multipart/form-data; boundary=bench-boundary"},
                      timeout=900)
        upload_s = time.perf_counter() - t0
        assert up.status_code == 204, up.text
        src, dst = top / "src.bin", top / "dst.bin"
        with src.open("wb") as f:
            for block in _blocks(size):
                f.write(block)
        t0 = time.perf_counter()
        shutil.copyfile(src, dst)
        with dst.open("rb+") as f:
            os.fsync(f.fileno())
        copy_s = time.perf_counter() - t0

        # Direct to the agent: free its socket by killing vmmgr (libvirt keeps the VM).
        health = httpx.get(suite.url + "/healthz").json()
        os.kill(int(health["services"]["vmmgr"]["details"]["pid"]), signal.SIGKILL)
        socket_path = str(data / "capsules" / capsule_id / "agent.sock")
        direct, direct_upload_s = trio.run(_direct, socket_path, args.execs, size)

        g, d = _median_ms(gateway), _median_ms(direct)
        print(f"exec `true` round trip (median of {args.execs}): gateway {g:.1f} ms, "
              f"agent {d:.1f} ms, ratio {g / d:.1f}x")
        up_rate, copy_rate = size / MiB / upload_s, size / MiB / copy_s
        agent_rate = size / MiB / direct_upload_s
        print(f"upload {args.upload_mb} MiB: gateway {up_rate:.1f} MiB/s, local copy "
              f"{copy_rate:.1f} MiB/s, ratio {copy_rate / up_rate:.1f}x slower; straight to the "
              f"guest agent {agent_rate:.1f} MiB/s (the gateway path is {agent_rate / up_rate:.1f}x slower)")
        return 0
    finally:
        if capsule_id and api is not None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # vmmgr may be restarting
                if api.delete(f"/v1/capsules/{capsule_id}").status_code in (202, 404):
                    break
                time.sleep(1)
            try:
                wait_status(api, capsule_id, "stopped", "error", "missing", timeout=120)
            except AssertionError as exc:
                print(f"warning: {exc}")
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
