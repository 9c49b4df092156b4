"""Where a create from a template spends its time, phase by phase, and what can move off its path.

Run (as root, libvirt installed): ``.venv/bin/python benchmarks/vmstart.py
[--restores 10] [--prestarted 5]``.

Opens the libvirt driver, the guest image and the ``minimal`` template as
``benchmarks/snapshots.py`` does (same modules, same cache), then restores
capsules one at a time (ids ``vstart-<hex>-<name>``, destroyed at the end)
and attributes each create's time to its phases, with evidence:

1. the driver's steps, timed around the unchanged driver (its overlay
   ``qemu-img create``, ``createXML``, ``_load_state``, ``resume``), the rest
   of ``Driver.create`` (lookups, file preparation) and agent ready (the
   guest agent answers a ping), over ``--restores`` restores without any
   extra logging;
2. inside ``createXML``: libvirtd's own debug log with timestamps, switched on
   at run time with ``virt-admin daemon-log-filters/-outputs`` for
   ``qemu.qemu_process`` only (its phase markers: ``Setting up domain cgroup``,
   ``Setting domain security labels``...) and put back as it was afterwards;
   one more create with the QMP traffic logged too counts libvirt's monitor
   commands. Logging costs a little: both ``createXML`` p50s are printed;
3. the wrapper (``vmmgr/emulator.py``, a bash script) alone: the same wrapper
   text over ``/bin/true`` with the real argument vector and environment, vs
   ``/bin/true`` straight;
4. QEMU alone, by hand (as root, no libvirt): the command line libvirt built
   for a restore (read from ``/proc/<pid>/cmdline``, its inherited fds
   replaced by paths) from exec to the QMP greeting, to ``qmp_capabilities``
   answered, and the guest-CPU read-back libvirt does after it (``qom-list`` +
   one ``qom-get`` per CPU property), over a plain socket;
5. a pre-started QEMU (prototype): ``createXML`` with ``START_PAUSED`` and
   ``-incoming defer`` and the overlay made ahead of time; at claim time only
   the device state is loaded and the vCPUs resumed. Its claim cost (to agent
   ready) and the idle cost of a waiting one (CPU, RSS) are printed;
6. ``createXML`` alone (paused, nothing loaded) for lighter domain documents,
   round robin;
7. agent ready after a claim, by when the host connects: right after resume,
   1 s after it, or before resume (the handshake waiting).

Findings, five runs on this 2-core TCG host (libvirt 9.0, QEMU 7.2; load average
3-7 from other work, so absolute times vary by up to 2x between runs, shares
much less; the last run after the client's re-pinging handshake, f660dbb; see
docs/architecture.md "Where a create's time goes"). Shares are a phase's p50
over the p50 of the totals:

- A restore to agent ready, p50 0.77-1.5 s: ``createXML`` 48-57%, agent ready
  20-39% (0.25-0.32 s), ``_load_state`` 3-7% (33-51 ms), the overlay 2-3%
  (20-37 ms), resume about 1% (7-13 ms), the rest of ``Driver.create`` under 1%.
- Inside ``createXML`` (0.33-0.94 s logged): libvirt's read-back of the guest
  CPU after QEMU is up is about half of it (45-63%, 0.19-0.26 s, 0.59 s in the
  most loaded run): one ``qom-get`` per CPU property, 398 of the 416 QMP
  commands of a whole create. QEMU alone answers the same 397 in 0.15-0.19 s
  (part 4), so the cost is QEMU's per command, not libvirt's. libvirt 9.0 does
  it for every x86 start whatever the ``<cpu>`` element says
  (``qemuProcessFetchGuestCPU``; ``check='none'`` and ``mode='maximum'`` were
  tried: still 398-400). Exec of the wrapper, QEMU's init and QMP
  negotiation: 17-21% (QEMU by hand: greeting after 27-55 ms,
  ``qmp_capabilities`` answered after 51-184 ms); the bash wrapper itself
  2-4 ms (8.5 ms in the most loaded run). Isolation: cgroups 3-6% (domain
  13-19 ms, vCPU threads 8-12 ms), the private ``/dev`` namespace 1% (3-7 ms),
  DAC labelling 1% (3-6 ms), virtlogd 1% (2-4 ms): under 10% together.
- Lighter domain documents (no VNC display, no virtio-rng, no console file)
  change ``createXML`` by less than the run-to-run noise (p50s -47..+164 ms
  both ways, mins within 10-90 ms): nothing to win there, and the guest
  devices must stay the template's anyway.
- A pre-started QEMU (``createXML`` paused with ``-incoming defer`` and the
  overlay made ahead: 0.38-0.76 s, off the path) waits at 0% CPU and ~47 MiB
  RSS. Its claim (device state + resume) is 47-74 ms against 0.43-1.1 s for
  overlay + ``createXML`` + state + resume, and 0.27-0.49 s to agent ready
  against 0.67-1.6 s for a full create in the same run. Setting
  ``x-ignore-shared`` when it is pre-started (and clearing it after the claim)
  takes two QMP calls off: 10-18 ms less in three runs of five, no gain in the
  two most loaded.
- Agent ready after a restore (p50 0.25-0.32 s, min 0.17 s) is the guest's:
  connecting 1 s after resume still takes 0.13-0.24 s (part 7), connecting
  before resume 0.29-0.31 s from the resume, a second connect right after
  ~20-30 ms. Likely the restored agent's first session: with the host end gone
  it loops open -> EOF -> back-off (up to ``MAX_REOPEN_BACKOFF_S``, 0.2 s of
  guest time) and sets a session up on cold TCG code. A first ping is lost
  in 0-1 of 12 creates per run (and as often on a reconnect); before f660dbb
  that cost the handshake's whole 1 s ping timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from benchmarks.snapshots import Bench, _agent_ready  # noqa: E402
from dovecote.vmmgr import accel as accel_mod  # noqa: E402
from dovecote.vmmgr import libvirt_driver as lv  # noqa: E402
from dovecote.vmmgr.domain_xml import build_domain_xml, domain_name  # noqa: E402
from dovecote.vmmgr.driver import VmSpec  # noqa: E402
from dovecote.vmmgr.emulator import install_wrapper, script_text  # noqa: E402
from dovecote.vmmgr.guest import client as agent_client  # noqa: E402
from dovecote.vmmgr.images import ensure_guest_image  # noqa: E402
from dovecote.vmmgr.overlay import create_overlay  # noqa: E402
from dovecote.vmmgr.templates import TemplateFiles, ensure_minimal  # noqa: E402
from tests.helpers.capsules import IMAGE_DIR, libvirt_ready  # noqa: E402

OP_TIMEOUT_S = 120.0
PREFIX = "vstart-"
LOG_FILTERS = "1:qemu.qemu_process"
DETAIL_FILTERS = "1:qemu.qemu_process 2:qemu.qemu_monitor"

# libvirtd's qemu_process markers (qemuProcessStart/Launch debug messages, libvirt 9.0), in
# order, and the phase that runs from each to the next one found.
MARKERS: list[tuple[str, str]] = [
    ("qemuProcessStart:", "libvirt: domain init, PCI addresses, labels chosen"),
    ("Updating guest CPU definition", "libvirt: guest CPU definition"),
    ("Preparing network devices", "libvirt: host prep (chardevs, masterKey file)"),
    ("Preparing disks (host)", "libvirt: host prep (disk chain)"),
    ("Preparing hostdevs (host-side)", "libvirt: host prep (rest)"),
    ("Creating domain log file", "virtlogd: domain log"),
    ("Building mount namespace", "fork/exec of the child, limits, handshake"),
    ("Building domain mount namespace", "mount namespace (/dev)"),
    ("Setting up domain cgroup", "cgroups (domain)"),
    ("Setting up domain perf", "emulator tuning, resctrl, PR"),
    ("Setting domain security labels", "DAC labelling (chown)"),
    ("Labelling done", "exec wrapper + QEMU init + QMP negotiation"),
    ("setting up hotpluggable cpus", "post-start queries (vCPUs)"),
    ("Verifying and updating provided guest CPU", "guest CPU check (qom-get per feature)"),
    ("Detecting IOThread PIDs", "post-start: iothreads, global CPU cgroup"),
    ("Setting vCPU tuning/settings", "cgroups (vCPU threads)"),
    ("Setting IOThread tuning/settings", "post-start: memory, disks, state refresh"),
    ("Writing domain status to disk", "status file, reply to the client"),
]
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\+0000: (\d+): \w+ : (\S+?):\d+ : (.*)$")


def _p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000 if samples else float("nan")


# -- timing the unchanged driver ------------------------------------------------------


class Probe:
    """Times the steps of each ``Driver.create`` by wrapping them; the driver is not changed."""

    def __init__(self, driver: lv.LibvirtDriver) -> None:
        self.driver = driver
        self.steps: dict[str, float] = {}
        self.xml_window: tuple[float, float] = (0.0, 0.0)
        """Wall-clock (``time.time``) call and return of the last ``createXML``."""
        self.pings = 0
        """Agent pings sent since the create began."""
        self.answered: list[int] = []
        """Which of them were answered (their order numbers), in the order of the answers."""
        self._conn = driver._conn
        self._overlay = lv.create_overlay
        self._load_state = driver._load_state
        self._ping = agent_client.AgentClient.ping

    def install(self) -> None:
        probe = self

        async def overlay(spec: VmSpec) -> None:
            began = time.perf_counter()
            await probe._overlay(spec)
            probe.steps["overlay"] = time.perf_counter() - began

        async def load_state(*args: Any) -> None:
            began = time.perf_counter()
            await probe._load_state(*args)
            probe.steps["load_state"] = time.perf_counter() - began

        async def ping(client: agent_client.AgentClient, *args: Any, **kwargs: Any) -> Any:
            number = probe.pings
            probe.pings += 1
            pong = await probe._ping(client, *args, **kwargs)
            probe.answered.append(number)
            return pong

        lv.create_overlay = overlay  # type: ignore[assignment]
        agent_client.AgentClient.ping = ping  # type: ignore[method-assign]
        setattr(self.driver, "_load_state", load_state)  # noqa: B010
        self.driver._conn = _TimedConn(self._conn, self)  # type: ignore[assignment]

    def uninstall(self) -> None:
        lv.create_overlay = self._overlay
        agent_client.AgentClient.ping = self._ping  # type: ignore[method-assign]
        with contextlib.suppress(AttributeError):
            delattr(self.driver, "_load_state")
        self.driver._conn = self._conn


class _TimedConn:
    """The driver's connection, with ``createXML`` timed and its domain's ``resume`` too."""

    def __init__(self, conn: libvirt.virConnect, probe: Probe) -> None:
        self._wrapped, self._probe = conn, probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def createXML(self, xml: str, flags: int = 0) -> Any:
        wall, began = time.time(), time.perf_counter()
        dom = self._wrapped.createXML(xml, flags)
        self._probe.steps["createXML"] = time.perf_counter() - began
        self._probe.xml_window = (wall, time.time())
        return _TimedDomain(dom, self._probe)


class _TimedDomain:
    """A domain whose ``resume`` is timed (libvirt_qemu reaches the real one through ``_o``)."""

    def __init__(self, dom: libvirt.virDomain, probe: Probe) -> None:
        self._wrapped, self._probe = dom, probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def resume(self) -> int:
        began = time.perf_counter()
        result = self._wrapped.resume()
        self._probe.steps["resume"] = time.perf_counter() - began
        return int(result)


# -- libvirtd's log --------------------------------------------------------------------


def _virt_admin(*args: str) -> str:
    return subprocess.run(["virt-admin", *args], check=True, capture_output=True, text=True,
                          timeout=30).stdout


@contextlib.contextmanager
def libvirtd_log(path: Path, filters: str) -> Iterator[None]:
    """libvirtd logs ``filters`` to ``path`` meanwhile; its own settings are put back after."""
    old_filters = _virt_admin("daemon-log-filters").split(":", 1)[1].strip()
    old_outputs = _virt_admin("daemon-log-outputs").split(":", 1)[1].strip()
    _virt_admin("daemon-log-outputs", f"1:file:{path}")
    try:
        _virt_admin("daemon-log-filters", filters)
        yield
    finally:
        _virt_admin("daemon-log-filters", old_filters)
        _virt_admin("daemon-log-outputs", old_outputs or "3:file:/var/log/libvirt/libvirtd.log")


def _wall(stamp: str) -> float:
    return datetime.strptime(stamp + "+0000", "%Y-%m-%d %H:%M:%S.%f%z").timestamp()


def log_phases(text: str, name: str, window: tuple[float, float]) -> dict[str, float]:
    """The ``createXML`` of domain ``name`` split at libvirtd's markers (seconds per phase).

    The thread that logged ``qemuProcessStart ... name=<name>`` is followed up to the
    status write; the RPC before it and the reply after it are measured against the
    client's own clock (``window``), so the phases add up to the ``createXML`` seen.
    """
    thread, stamps = None, []
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if not match:
            continue
        stamp, tid, func, message = match.groups()
        if thread is None:
            if func == "qemuProcessStart" and f"name={name} " in message:
                thread = tid
                stamps.append((0, _wall(stamp)))
            continue
        if tid != thread:
            continue
        for index, (marker, _phase) in enumerate(MARKERS):
            if index > stamps[-1][0] and (marker in message) and not any(i == index for i, _ in stamps):
                stamps.append((index, _wall(stamp)))
                break
        if stamps[-1][0] == len(MARKERS) - 1:
            break
    phases: dict[str, float] = {}
    if not stamps:
        return phases
    phases["RPC to libvirtd, XML parse, define"] = max(0.0, stamps[0][1] - window[0])
    for (index, at), (_next, next_at) in itertools.pairwise(stamps):
        label = MARKERS[index][1]
        phases[label] = phases.get(label, 0.0) + max(0.0, next_at - at)
    last = MARKERS[stamps[-1][0]][1]
    phases[last] = phases.get(last, 0.0) + max(0.0, window[1] - stamps[-1][1])
    return phases


def qmp_commands(text: str, name: str) -> dict[str, int]:
    """Commands sent on the monitor of domain ``name`` (the one its start thread used first)."""
    thread = monitor = None
    commands: dict[str, int] = {}
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if not match:
            continue
        _stamp, tid, func, message = match.groups()
        if thread is None:
            if func == "qemuProcessStart" and f"name={name} " in message:
                thread = tid
            continue
        sent = re.match(r'QEMU_MONITOR_SEND_MSG: mon=(\S+) msg=\{"execute":"([\w-]+)"', message)
        if sent is None:
            continue
        if monitor is None and tid == thread:
            monitor = sent.group(1)
        if monitor is not None and sent.group(1) == monitor:
            commands[sent.group(2)] = commands.get(sent.group(2), 0) + 1
    return commands


# -- the runs ----------------------------------------------------------------------------


class VmstartBench(Bench):
    """:class:`benchmarks.snapshots.Bench` with this benchmark's capsule ids (``vstart-...``)."""

    def spec(self, name: str, memory_mib: int) -> VmSpec:
        spec = super().spec(name, memory_mib)
        return dataclasses.replace(spec, capsule_id=PREFIX + spec.capsule_id.removeprefix("bench-"))


@dataclasses.dataclass
class Sample:
    steps: dict[str, float]
    """Seconds per step of the create (see :func:`_restore`)."""
    lost_ping: bool = False
    """The agent's first ping went unanswered: a later one was answered first."""
    agent_again: float = 0.0
    """A second connect + ping right after (the guest's code paths warm): not in the total."""
    lost_again: bool = False
    inside: dict[str, float] = dataclasses.field(default_factory=dict)
    """``createXML`` split by libvirtd's log (when it was on)."""


async def _restore(bench: Bench, probe: Probe, template: TemplateFiles, name: str, *,
                   log: Path | None = None, keep: bool = False) -> tuple[Sample, VmSpec]:
    """One create from the template to agent ready, every step timed."""
    spec = template.restore_spec(bench.spec(name, template.memory_mb))
    probe.steps = {}
    probe.pings, probe.answered = 0, []
    began = time.perf_counter()
    await bench.start(spec)
    created = time.perf_counter() - began
    await _agent_ready(spec.agent_socket_path, OP_TIMEOUT_S)
    steps = dict(probe.steps)
    steps["agent"] = time.perf_counter() - began - created
    lost_first = probe.answered[:1] != [0]
    probe.pings, probe.answered = 0, []
    again = time.perf_counter()
    await _agent_ready(spec.agent_socket_path, OP_TIMEOUT_S)
    again = time.perf_counter() - again
    timed = ("overlay", "createXML", "load_state", "resume")
    steps["driver"] = created - sum(steps.get(k, 0.0) for k in timed)
    sample = Sample(steps=steps, lost_ping=lost_first, agent_again=again,
                    lost_again=probe.answered[:1] != [0])
    if log is not None:
        text = await trio.to_thread.run_sync(functools.partial(log.read_text, errors="replace"))
        sample.inside = log_phases(text, domain_name(spec.capsule_id), probe.xml_window)
    if not keep:
        await bench.destroy(spec.capsule_id)
    return sample, spec


STEP_LABELS = [
    ("driver", "Driver.create: lookups, socket/file prep"),
    ("overlay", "overlay (qemu-img create)"),
    ("createXML", "libvirt createXML"),
    ("load_state", "_load_state (QMP: caps, getfd, migrate-incoming, wait)"),
    ("resume", "resume (virDomainResume)"),
    ("agent", "guest agent ready (connect + ping)"),
]


def _print_table(title: str, rows: list[tuple[str, list[float]]], total: list[float]) -> None:
    total_p50 = _p50_ms(total)
    print(f"\n{title}")
    print(f"   {'phase':<58} {'p50 ms':>8} {'share':>6}")
    for label, samples in rows:
        p50 = _p50_ms(samples)
        print(f"   {label:<58} {p50:8.1f} {p50 / total_p50 * 100:5.0f}%")
    print(f"   {'total (p50 of the sums)':<58} {total_p50:8.1f}")


async def _measure_restores(bench: Bench, probe: Probe, template: TemplateFiles, top: Path,
                            count: int) -> VmSpec:
    """Parts 1 and 2; returns the spec of a restored VM left running (for part 4's command line)."""
    await _restore(bench, probe, template, "warm")  # page cache, libvirt's caches
    plain: list[Sample] = []
    logged: list[Sample] = []
    log = top / "libvirtd.log"
    for i in range(count):  # alternated, so that the host's load hits both alike
        plain.append((await _restore(bench, probe, template, f"r{i}"))[0])
        log.unlink(missing_ok=True)
        with libvirtd_log(log, LOG_FILTERS):
            logged.append((await _restore(bench, probe, template, f"l{i}", log=log))[0])
    totals = [sum(s.steps.values()) for s in plain]
    _print_table(f"1. create from the template to agent ready ({count}x, no extra logging):",
                 [(label, [s.steps.get(key, 0.0) for s in plain]) for key, label in STEP_LABELS], totals)
    agent = sorted(s.steps["agent"] for s in plain)
    print(f"   agent ready: min {agent[0] * 1000:.0f} ms, max {agent[-1] * 1000:.0f} ms; the first ping "
          f"went unanswered (a later one answered first) in {sum(s.lost_ping for s in plain)} of {count}; "
          f"a second connect + ping right after: p50 {_p50_ms([s.agent_again for s in plain]):.0f} ms, "
          f"max {max(s.agent_again for s in plain) * 1000:.0f} ms, first ping unanswered in "
          f"{sum(s.lost_again for s in plain)} of {count}")

    labels = list(dict.fromkeys(label for s in logged for label in s.inside))
    xml = [s.steps["createXML"] for s in logged]
    _print_table(f"2. inside createXML, from libvirtd's log ({count}x; createXML p50 {_p50_ms(xml):.0f} ms "
                 f"logged vs {_p50_ms([s.steps['createXML'] for s in plain]):.0f} ms not):",
                 [(label, [s.inside.get(label, 0.0) for s in logged]) for label in labels], xml)

    log.unlink(missing_ok=True)
    with libvirtd_log(log, DETAIL_FILTERS):
        _sample, spec = await _restore(bench, probe, template, "detail", log=log, keep=True)
    commands = qmp_commands(log.read_text(errors="replace"), domain_name(spec.capsule_id))
    print(f"   QMP commands libvirt sent to that QEMU (createXML, _load_state, resume; one create with "
          f"the monitor logged): {sum(commands.values())}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(commands.items(), key=lambda kv: -kv[1])))
    return spec


def _qemu_argv(spec: VmSpec) -> tuple[list[str], dict[str, str]]:
    """The running QEMU's argument vector (after the wrapper) and the wrapper's environment."""
    pid = int(Path(f"/run/libvirt/qemu/{domain_name(spec.capsule_id)}.pid").read_text().strip())
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    env = {"DOVECOTE_MEM_PATH": str(spec.memory_file), "DOVECOTE_MEM_SHARE": "false",
           "DOVECOTE_INCOMING": "defer"}
    return [a.decode() for a in argv], env


def _wrapper_cost(argv: list[str], env: dict[str, str], top: Path, runs: int = 30) -> tuple[float, float]:
    """p50 seconds of the wrapper over ``/bin/true`` with QEMU's arguments, and of ``/bin/true`` alone."""
    wrapper = top / "wrapper-true"
    wrapper.write_text(script_text("/bin/true"))
    wrapper.chmod(0o755)
    # What libvirt hands the wrapper: the RAM backend still memory-backend-ram, no -incoming.
    args = [re.sub(r'"memory-backend-file","id":"pc.ram","size":(\d+),.*}',
                   r'"memory-backend-ram","id":"pc.ram","size":\1}', a) for a in argv[1:]]
    if "-incoming" in args:
        cut = args.index("-incoming")
        del args[cut:cut + 2]
    full_env = {**os.environ, **env}

    def timed(cmd: list[str]) -> float:
        samples = []
        for _ in range(runs):
            began = time.perf_counter()
            subprocess.run(cmd, env=full_env, check=True)
            samples.append(time.perf_counter() - began)
        return statistics.median(samples)

    return timed([str(wrapper), *args]), timed(["/bin/true", *args])


def _by_hand_argv(argv: list[str], top: Path, overlay: Path) -> tuple[list[str], Path]:
    """QEMU's command line runnable without libvirt: fds become paths in ``top``."""
    monitor = top / "mon.sock"
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "-object" and '"masterKey0"' in argv[i + 1]:
            skip = True
            continue
        if arg == "-add-fd":
            skip = True
            continue
        arg = re.sub(r"id=charmonitor,fd=\d+", f"id=charmonitor,path={monitor}", arg)
        arg = re.sub(r"id=charchannel0,fd=\d+", f"id=charchannel0,path={top / 'agent.sock'}", arg)
        arg = arg.replace("path=/dev/fdset/0", f"path={top / 'console.log'}")
        arg = re.sub(r"vnc=unix:[^,]+", f"vnc=unix:{top / 'vnc.sock'}", arg)
        arg = re.sub(r'"filename":"[^"]*/disk\.qcow2","node-name":"libvirt-1-storage"',
                     f'"filename":"{overlay}","node-name":"libvirt-1-storage"', arg)
        out.append(arg)
    return out, monitor


def _qmp_by_hand(argv: list[str], monitor: Path) -> dict[str, float]:
    """Exec QEMU, then seconds to the QMP greeting, to ``qmp_capabilities``, to the CPU read-back."""
    marks: dict[str, float] = {}
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        sock = socket.socket(socket.AF_UNIX)
        deadline = began + 30
        while True:
            try:
                sock.connect(str(monitor))
                break
            except OSError:
                if time.perf_counter() > deadline or proc.poll() is not None:
                    err = proc.stderr.read() if proc.stderr else b""
                    raise RuntimeError(f"QEMU by hand: no monitor ({err!r})") from None
                time.sleep(0.0005)
        sock.settimeout(30)
        reader = sock.makefile("rb")

        def call(command: str, **arguments: Any) -> Any:
            sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline())
                if "return" in reply or "error" in reply:
                    return reply.get("return")

        reader.readline()
        marks["greeting"] = time.perf_counter() - began
        call("qmp_capabilities")
        marks["capabilities"] = time.perf_counter() - began
        cpu = "/machine/unattached/device[0]"
        props = [p["name"] for p in call("qom-list", path=cpu) if p.get("type") == "bool"]
        for prop in props:
            call("qom-get", path=cpu, property=prop)
        marks["cpu_readback"] = time.perf_counter() - began
        marks["qom_gets"] = float(len(props))
        call("quit")
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return marks


async def _measure_processes(spec: VmSpec, top: Path, runs: int) -> None:
    """Parts 3 and 4: the wrapper alone and QEMU alone, with the restore's own command line."""
    argv, env = _qemu_argv(spec)
    wrapped, bare = await trio.to_thread.run_sync(_wrapper_cost, argv, env, top)
    print(f"\n3. the wrapper (bash, vmmgr/emulator.py) over /bin/true with QEMU's {len(argv) - 1} arguments: "
          f"p50 {wrapped * 1000:.1f} ms vs /bin/true alone {bare * 1000:.1f} ms: "
          f"{(wrapped - bare) * 1000:.1f} ms of a create")
    hand = top / "byhand"
    hand.mkdir(mode=0o755)
    overlay = hand / "disk.qcow2"
    samples: list[dict[str, float]] = []
    for _ in range(runs):
        overlay.unlink(missing_ok=True)
        await create_overlay(dataclasses.replace(spec, overlay_path=overlay))
        by_hand, monitor = _by_hand_argv(argv, hand, overlay)
        samples.append(await trio.to_thread.run_sync(_qmp_by_hand, by_hand, monitor))
    def p50(key: str) -> float:
        return _p50_ms([s[key] for s in samples])
    print(f"4. QEMU by hand, libvirt's command line for a restore ({runs}x, as root, no libvirt): "
          f"exec -> QMP greeting p50 {p50('greeting'):.0f} ms, -> qmp_capabilities "
          f"{p50('capabilities'):.0f} ms, guest-CPU read-back ({samples[0]['qom_gets']:.0f} qom-get) "
          f"{p50('cpu_readback') - p50('capabilities'):.0f} ms more")


async def _prestart(bench: Bench, driver: lv.LibvirtDriver, template: TemplateFiles,
                    name: str) -> tuple[VmSpec, libvirt.virDomain]:
    """Ahead of time: overlay, and QEMU started paused waiting for an incoming state."""
    spec = template.restore_spec(bench.spec(name, template.memory_mb))
    xml = build_domain_xml(driver._domain_config(spec))
    await create_overlay(spec)
    bench.live.add(spec.capsule_id)
    with trio.fail_after(OP_TIMEOUT_S):
        dom = await trio.to_thread.run_sync(driver._conn.createXML, xml, libvirt.VIR_DOMAIN_START_PAUSED)
    return spec, dom


def _idle_cost(capsule_id: str, seconds: float = 3.0) -> tuple[float, float]:
    """CPU share of a core and RSS (MiB) of a waiting QEMU over ``seconds``."""
    pid = int(Path(f"/run/libvirt/qemu/{domain_name(capsule_id)}.pid").read_text().strip())

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu()
    time.sleep(seconds)
    used = cpu() - before
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:")) / 1024
    return used / seconds, rss


async def _claim(driver: lv.LibvirtDriver, spec: VmSpec, dom: libvirt.virDomain, state: Path, *,
                 lean: bool) -> dict[str, float]:
    """Load the device state into a pre-started QEMU and resume it, until the agent answers.

    ``lean``: the ``x-ignore-shared`` capability was set when the QEMU was pre-started, and
    is cleared after the agent answered (off the claim's path): two QMP calls fewer.
    """
    marks: dict[str, float] = {}
    began = time.perf_counter()
    with trio.fail_after(OP_TIMEOUT_S):
        if lean:
            read_end, write_end = os.pipe()
            try:
                await driver._qmp(dom, "getfd", spec.capsule_id, files=[read_end], fdname="dovecote-in")
            finally:
                os.close(read_end)
            try:
                await driver._qmp(dom, "migrate-incoming", spec.capsule_id, uri="fd:dovecote-in")
                await trio.to_thread.run_sync(lv._copy_file_to_fd, state, write_end)
            finally:
                os.close(write_end)
            await driver._wait_migration(dom, spec.capsule_id, incoming=True)
        else:
            await driver._load_state(dom, spec.capsule_id, state)
        marks["load_state"] = time.perf_counter() - began
        await trio.to_thread.run_sync(dom.resume)
        marks["resume"] = time.perf_counter() - began - marks["load_state"]
    await _agent_ready(spec.agent_socket_path, OP_TIMEOUT_S)
    marks["total"] = time.perf_counter() - began
    marks["agent"] = marks["total"] - marks["load_state"] - marks["resume"]
    if lean:
        await driver._qmp(dom, "migrate-set-capabilities", spec.capsule_id,
                          capabilities=[{"capability": "x-ignore-shared", "state": False}])
    return marks


async def _measure_prestarted(bench: Bench, probe: Probe, template: TemplateFiles, count: int) -> None:
    """Part 5: claims of pre-started QEMUs vs a full create, alternated (the host's load hits all)."""
    driver = probe.driver
    ahead: list[float] = []
    full: list[Sample] = []
    claims: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    idle: tuple[float, float] = (0.0, 0.0)
    for i in range(count):
        full.append((await _restore(bench, probe, template, f"f{i}"))[0])
        for lean in (False, True):
            began = time.perf_counter()
            spec, dom = await _prestart(bench, driver, template, f"p{i}{'l' if lean else ''}")
            if lean:
                await driver._qmp(dom, "migrate-set-capabilities", spec.capsule_id,
                                  capabilities=[{"capability": "x-ignore-shared", "state": True}])
            ahead.append(time.perf_counter() - began)
            await trio.sleep(0.5)  # settled, as a waiting one would be
            if i == 0 and not lean:
                idle = await trio.to_thread.run_sync(_idle_cost, spec.capsule_id)
            claims[lean].append(await _claim(driver, spec, dom, template.state, lean=lean))
            await bench.destroy(spec.capsule_id)

    full_total = _p50_ms([sum(s.steps.values()) for s in full])
    full_no_agent = _p50_ms([sum(s.steps.values()) - s.steps["agent"] for s in full])
    print(f"\n5. pre-started QEMU (prototype, {count}x each, alternated with a full create): ahead of "
          f"time (overlay + createXML paused, -incoming defer) p50 {_p50_ms(ahead):.0f} ms; a waiting "
          f"one uses {idle[0] * 100:.1f}% of a core, RSS {idle[1]:.0f} MiB")
    print(f"   full create (overlay, createXML, state, resume) p50 {full_no_agent:.0f} ms, to agent ready "
          f"{full_total:.0f} ms")
    for lean, label in ((False, "claim (driver's _load_state)"), (True, "claim, capability set ahead")):
        def p50(key: str, lean: bool = lean) -> float:
            return _p50_ms([c[key] for c in claims[lean]])

        print(f"   {label:<30} state + resume p50 {p50('load_state') + p50('resume'):.0f} ms "
              f"(_load_state {p50('load_state'):.0f}, resume {p50('resume'):.0f}), to agent ready "
              f"{p50('total'):.0f} ms: {full_total - p50('total'):.0f} ms less than a full create")


async def _resume_after(dom: libvirt.virDomain, delay: float, at: list[float]) -> None:
    await trio.sleep(delay)
    at.append(time.perf_counter())
    await trio.to_thread.run_sync(dom.resume)


async def _measure_agent(bench: Bench, driver: lv.LibvirtDriver, template: TemplateFiles,
                         count: int) -> None:
    """Part 7: agent ready after a claim, by when the host connects (round robin)."""
    modes = ("right after resume", "1 s after resume", "before resume")
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(count):
        for j, mode in enumerate(modes):
            spec, dom = await _prestart(bench, driver, template, f"a{i}m{j}")
            await trio.sleep(0.3)
            with trio.fail_after(OP_TIMEOUT_S):
                await driver._load_state(dom, spec.capsule_id, template.state)
                if mode == "before resume":
                    resumed: list[float] = []
                    async with trio.open_nursery() as nursery:
                        # the handshake connects and waits; the vCPUs run 0.2 s later
                        nursery.start_soon(_resume_after, dom, 0.2, resumed)
                        await _agent_ready(spec.agent_socket_path, OP_TIMEOUT_S)
                    samples[mode].append(time.perf_counter() - resumed[0])
                else:
                    await trio.to_thread.run_sync(dom.resume)
                    if mode == "1 s after resume":
                        await trio.sleep(1.0)
                    began = time.perf_counter()
                    await _agent_ready(spec.agent_socket_path, OP_TIMEOUT_S)
                    samples[mode].append(time.perf_counter() - began)
            await bench.destroy(spec.capsule_id)
    print(f"\n7. agent ready after a claim by when the host connects ({count}x each, round robin): "
          + "; ".join(f"{mode} p50 {_p50_ms(samples[mode]):.0f} ms" for mode in modes)
          + " (from the connect; before resume: from the resume)")


def _drop(*paths: str) -> Callable[[str], str]:
    def transform(xml: str) -> str:
        root = ET.fromstring(xml)
        for path in paths:
            for element in root.findall(path):
                parent = root.find(path.rsplit("/", 1)[0]) if "/" in path else root
                if parent is not None:
                    parent.remove(element)
        return ET.tostring(root, encoding="unicode")
    return transform


XML_VARIANTS: list[tuple[str, Callable[[str], str]]] = [
    ("as built (vmmgr/domain_xml.py)", _drop()),
    ("no VNC display (graphics, video)", _drop("devices/graphics", "devices/video")),
    ("no virtio-rng", _drop("devices/rng")),
    ("no serial console file (virtlogd)", _drop("devices/serial", "devices/console")),
    ("none of the three", _drop("devices/graphics", "devices/video", "devices/rng", "devices/serial",
                                "devices/console")),
]


async def _measure_xml_variants(bench: Bench, probe: Probe, template: TemplateFiles, count: int) -> None:
    """Part 6: createXML alone (paused, -incoming defer, no state loaded) for lighter documents."""
    driver = probe.driver
    samples: dict[str, list[float]] = {label: [] for label, _ in XML_VARIANTS}
    for i in range(count):
        for j, (label, transform) in enumerate(XML_VARIANTS):
            spec = template.restore_spec(bench.spec(f"x{i}v{j}", template.memory_mb))
            xml = transform(build_domain_xml(driver._domain_config(spec)))
            await create_overlay(spec)
            bench.live.add(spec.capsule_id)
            with trio.fail_after(OP_TIMEOUT_S):
                await trio.to_thread.run_sync(driver._conn.createXML, xml, libvirt.VIR_DOMAIN_START_PAUSED)
            samples[label].append(probe.steps["createXML"])
            await bench.destroy(spec.capsule_id)
    base = _p50_ms(samples[XML_VARIANTS[0][0]])
    print(f"\n6. createXML alone by domain document ({count}x each, round robin; the guest devices "
          "must match the template's, so this times libvirt's work only):")
    for label, _ in XML_VARIANTS:
        p50, least = _p50_ms(samples[label]), min(samples[label]) * 1000
        print(f"   {label:<40} p50 {p50:6.1f} ms ({p50 - base:+.1f} ms), min {least:.0f} ms")


async def _run(args: argparse.Namespace, image_dir: Path, top: Path) -> int:
    image = await ensure_guest_image(image_dir)
    chosen = await accel_mod.choose_accel(
        probe=lambda: accel_mod.probe_kvm(image.kernel, image.initrd),
        key=accel_mod.probe_key(image_id=image.image_id),
        cache_file=image_dir / "accel.json")
    emulator = await trio.to_thread.run_sync(install_wrapper, image_dir)
    async with lv.open_libvirt_driver(lv.DEFAULT_URI, accel=chosen, emulator=emulator) as driver:
        template = await ensure_minimal(driver, image, image_dir, boot_timeout_s=300.0)
        print(f"guest image {image.image_id[:16]}, accel {chosen}, template {template.directory.name}, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        bench = VmstartBench(driver=driver, image=image, top=top)
        probe = Probe(driver)
        probe.install()
        try:
            spec = await _measure_restores(bench, probe, template, top, args.restores)
            await _measure_processes(spec, top, min(args.restores, 5))
            await bench.destroy(spec.capsule_id)
            await _measure_prestarted(bench, probe, template, args.prestarted)
            await _measure_xml_variants(bench, probe, template, args.prestarted)
            await _measure_agent(bench, driver, template, args.prestarted)
            print(f"\nload average at the end {os.getloadavg()[0]:.1f} (other work on the host adds noise: "
                  "parts 5 and 6 alternate what they compare)")
        finally:
            probe.uninstall()
            with trio.CancelScope(shield=True):
                await bench.destroy_all()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--restores", type=int, default=10, help="restores per part (default 10)")
    parser.add_argument("--prestarted", type=int, default=5, help="pre-started QEMU claims (default 5)")
    parser.add_argument("--image-dir", default=IMAGE_DIR, help=f"guest image cache (default {IMAGE_DIR})")
    args = parser.parse_args()
    if args.restores < 1 or args.prestarted < 1:
        parser.error("--restores and --prestarted must be at least 1")
    if os.geteuid() != 0:
        print("cannot run: needs root (qemu:///system, virt-admin, the shared image cache)")
        return 2
    reason = libvirt_ready()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    image_dir = Path(args.image_dir)
    top = Path(tempfile.mkdtemp(prefix="dcvstart-", dir="/tmp"))
    top.chmod(0o755)  # QEMU runs unprivileged: the VM directories must be searchable
    try:
        return trio.run(_run, args, image_dir, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
