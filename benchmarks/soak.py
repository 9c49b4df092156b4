"""Soak: pause and resume one capsule many times; nothing it holds may be lost.

Run (as root, libvirt installed): ``.venv/bin/python benchmarks/soak.py
[--cycles 100]``.

Starts ``dovecote up`` with the libvirt driver in a fresh data directory under
``/tmp`` (the shared guest image cache ``DOVECOTE_TEST_IMAGE_DIR``, default
``/var/tmp/dovecote/images``; no warm pool, so that no idle spare competes for
the CPU), signs up a user, creates one ``minimal`` capsule and starts in it a
background process that appends 1, 2, 3... to a file on the capsule's disk
five times a second. Then, ``--cycles`` times, through the public API:

1. write a file of random bytes (``files/write``);
2. pause (``POST .../pause`` until ``GET`` says ``paused``, polled every 20 ms);
3. resume (``POST .../resume`` until ``running``);
4. check: the counting process is the same one and still runs (``/processes``),
   its file reads 1..N with no gap and past the value it had before the pause,
   and the file written in step 1 reads back byte for byte.

A cycle that fails a check counts as a data loss (the run goes on). At the
end every file written is read back once more. It prints the cycles, the data
losses (must be 0) and pause/resume p50/p99 (nearest rank); it exits 1 when
anything was lost. A cycle takes a few seconds under TCG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.capsules import IMAGE_DIR, Api, api_client, libvirt_ready  # noqa: E402
from tests.helpers.suite import Suite  # noqa: E402

COUNT_LOG = "/var/tmp/soak/count.log"
COUNTER = f"mkdir -p /var/tmp/soak; i=0; while true; do i=$((i+1)); echo $i >> {COUNT_LOG}; sleep 0.2; done"
FILES = "/var/tmp/soak/files"
BOOT_TIMEOUT_S = 1800.0  # a first build of the image and template takes minutes
STEP_TIMEOUT_S = 120.0
POLL_S = 0.02


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile of ``samples`` (``p`` in 0..100)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Soak:
    def __init__(self, api: Api, capsule_id: str) -> None:
        self.api = api
        self.capsule_id = capsule_id
        self.base = f"/v1/capsules/{capsule_id}"
        self.counter_pid = 0
        self.files: dict[str, bytes] = {}

    def wait(self, *statuses: str, timeout: float = STEP_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            response = self.api.get(self.base)
            status = str(response.json().get("status")) if response.status_code == 200 else ""
            if status in statuses:
                return status
            if status in ("error", "missing") or time.monotonic() > deadline:
                raise RuntimeError(f"capsule {self.capsule_id} is {status or response.text}, "
                                   f"not {statuses}")
            time.sleep(POLL_S)

    def out(self, cmd: str) -> str:
        response = self.api.post(f"{self.base}/exec", {"cmd": cmd})
        if response.status_code != 200 or response.json()["exit_code"] != 0:
            raise RuntimeError(f"{cmd!r}: {response.status_code} {response.text[:300]}")
        return str(response.json()["stdout"])

    def counts(self) -> list[int]:
        return [int(line) for line in self.out(f"cat {COUNT_LOG}").split()]

    def start_counter(self) -> None:
        self.out(f"mkdir -p {FILES}")
        started = self.api.post(f"{self.base}/exec", {"cmd": COUNTER, "background": True, "tag": "soak"})
        if started.status_code != 202:
            raise RuntimeError(f"the counter did not start: {started.text}")
        self.counter_pid = int(started.json()["pid"])
        time.sleep(1)

    def write_file(self, cycle: int) -> str:
        path = f"{FILES}/cycle-{cycle:04d}.bin"
        data = secrets.token_bytes(4096 + cycle)
        written = self.api.post(f"{self.base}/files/write", data={"path": path},
                                files={"file": (Path(path).name, data)})
        if written.status_code != 204:
            raise RuntimeError(f"write {path}: {written.status_code} {written.text[:300]}")
        self.files[path] = data
        return path

    def read_ok(self, path: str) -> bool:
        read = self.api.post(f"{self.base}/files/read", {"path": path})
        return read.status_code == 200 and read.content == self.files[path]

    def counter_alive(self) -> bool:
        processes = self.api.get(f"{self.base}/processes").json()["processes"]
        return any(p["pid"] == self.counter_pid and p.get("tag") == "soak" for p in processes)

    def timed(self, action: str, until: str) -> float:
        began = time.monotonic()
        response = self.api.post(f"{self.base}/{action}")
        if response.status_code != 202:
            raise RuntimeError(f"{action}: {response.status_code} {response.text[:300]}")
        self.wait(until)
        return time.monotonic() - began

    def cycle(self, number: int) -> tuple[float, float, list[str]]:
        """One pause/resume; returns (pause s, resume s, what was lost)."""
        path = self.write_file(number)
        before = self.counts()[-1]
        pause_s = self.timed("pause", "paused")
        resume_s = self.timed("resume", "running")
        lost = []
        if not self.counter_alive():
            lost.append("the counting process is gone")
        time.sleep(0.5)
        counts = self.counts()
        if counts != list(range(1, len(counts) + 1)):
            lost.append("the counter's file has a gap or a mangled line")
        if counts[-1] <= before:
            lost.append(f"the counter did not go on ({counts[-1]} <= {before})")
        if not self.read_ok(path):
            lost.append(f"{path} does not read back")
        return pause_s, resume_s, lost


def run(cycles: int) -> int:
    top = Path(tempfile.mkdtemp(prefix="dcsoak-", dir="/tmp"))
    top.chmod(0o755)  # QEMU runs unprivileged: the capsule directories must be searchable
    Path(IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    suite = Suite(data_dir=top / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR, "DOVECOTE_VM_POOL_SIZE": "0",
        "DOVECOTE_VM_BOOT_TIMEOUT_S": "600"})
    capsule_id = ""
    api: Api | None = None
    try:
        suite.wait_ready()
        (top / "data").chmod(0o755)
        api = api_client(suite, "Soak")
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            created = api.post("/v1/capsules", {"template": "minimal"})
            if created.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(5)
        if created.status_code != 202:
            raise RuntimeError(f"create: {created.status_code} {created.text}")
        capsule_id = created.json()["id"]
        soak = Soak(api, capsule_id)
        soak.wait("running", timeout=BOOT_TIMEOUT_S)
        soak.start_counter()
        pauses: list[float] = []
        resumes: list[float] = []
        losses = 0
        began = time.monotonic()
        for number in range(1, cycles + 1):
            pause_s, resume_s, lost = soak.cycle(number)
            pauses.append(pause_s)
            resumes.append(resume_s)
            if lost:
                losses += 1
                print(f"cycle {number}: LOST: {'; '.join(lost)}", flush=True)
            if number % 10 == 0 or number == cycles:
                print(f"  {number}/{cycles} cycles, {losses} with losses, "
                      f"{time.monotonic() - began:.0f} s", flush=True)
        unreadable = [path for path in soak.files if not soak.read_ok(path)]
        if unreadable:
            print(f"files that no longer read back at the end: {unreadable}")
        final = soak.counts()
        print()
        print(f"capsule {capsule_id}: 1 vCPU / 512 MB, counter at {final[-1]} "
              f"({len(final)} lines, process {soak.counter_pid} "
              f"{'alive' if soak.counter_alive() else 'GONE'})")
        print(f"cycles:       {cycles}")
        print(f"data losses:  {losses + len(unreadable)}")
        print(f"pause:        p50 {percentile(pauses, 50) * 1000:.0f} ms, "
              f"p99 {percentile(pauses, 99) * 1000:.0f} ms (max {max(pauses) * 1000:.0f} ms)")
        print(f"resume:       p50 {percentile(resumes, 50) * 1000:.0f} ms, "
              f"p99 {percentile(resumes, 99) * 1000:.0f} ms (max {max(resumes) * 1000:.0f} ms)")
        print("(pause: POST .../pause until GET says paused; resume: POST .../resume until running)")
        _print_steps(top / "data" / "logs" / "vmmgr.log", resumes)
        return 1 if losses or unreadable else 0
    except BaseException:
        print("".join(suite.output[-80:]))
        raise
    finally:
        if api is not None and capsule_id:
            api.delete(f"/v1/capsules/{capsule_id}")
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


def _print_steps(log_file: Path, resumes: list[float]) -> None:
    """Where a pause's and a resume's time goes inside vmmgr's driver (its log's ``steps_ms``)."""
    steps: dict[str, dict[str, list[float]]] = {"pause": {}, "resume": {}}
    try:
        lines = log_file.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        msg = str(entry.get("msg", ""))
        kind = "pause" if "paused through its RAM file" in msg else (
            "resume" if "resumed through its RAM file" in msg else None)
        if kind is not None and isinstance(entry.get("steps_ms"), dict):
            for name, value in entry["steps_ms"].items():
                steps[kind].setdefault(name, []).append(float(value))
    for kind, found in steps.items():
        if found:
            parts = ", ".join(f"{name} {statistics.median(values):.0f}" for name, values in found.items())
            print(f"{kind} in the driver, p50 ms: {parts}")
    driver_total = steps["resume"].get("total")
    if driver_total and resumes:
        rest = statistics.median(resumes) * 1000 - statistics.median(driver_total)
        print(f"resume outside the driver (the API, the bus, the agent's reconnect, polling), "
              f"p50: {rest:.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100, help="pause/resume cycles (default 100)")
    args = parser.parse_args()
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    if os.geteuid() != 0:
        print("cannot run: needs root (qemu:///system, the shared image cache)")
        return 2
    reason = libvirt_ready()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    return run(args.cycles)


if __name__ == "__main__":
    sys.exit(main())
