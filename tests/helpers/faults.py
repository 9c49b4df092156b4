"""Faults under load: SIGKILL each service of a running ``dovecote up`` while clients work.

Shared by ``tests/suite/test_faults.py`` (a few minutes) and
``benchmarks/faults.py`` (the long version). A :class:`FaultRun` drives, over
real HTTP with an API key, a steady load against a suite started with the
supervisor and VMs (``DOVECOTE_VM_DRIVER=libvirt``):

* execs (``echo <token>``) and file writes on a few long-lived capsules,
* a bounded series of creates, each waited to ``running`` and destroyed,
* SSE clients of ``/v1/events/stream`` that reconnect with ``Last-Event-ID``,

while :meth:`FaultRun.kill_each` SIGKILLs each supervised process in turn
(found in the supervisor's process tree) and times how long until the
supervisor has a new one and ``/healthz`` answers 200.

Every request is logged in a :class:`Ledger` with its outcome; every request
has a client timeout far above what the server needs (a timeout is a *hang*).
:meth:`FaultRun.verdict` then checks, once things settled:

* each killed service came back and ``/healthz`` was 200 within the limit;
* no request hung; every HTTP error is in the documented shape, and is a
  503/502/504 (a killed dependency), never a 500 or a 4xx for a valid request;
  errors and dropped connections happen only around a kill;
* no capsule is lost (every 202 create is listed) or left in a transitional
  status; the long-lived capsules still run;
* every 2xx file write reads back; the event log holds exactly one
  ``capsule.create`` per 202 create and one ``capsule.destroy`` per 202
  destroy; each SSE client saw strictly increasing ids (no duplicates across
  its reconnections) and, at the end, every event of the team's log after
  its first position (no gaps).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.helpers.capsules import BOOT_TIMEOUT_S, IMAGE_DIR, api_client, wait_status
from tests.helpers.suite import Suite, get_json

KILLED_IN_TURN = ("broker", "auth", "vmmgr", "gateway", "notifier", "metrics", "recorder")
"""The order of the kills: the gateway's kill drops every connection, so it does
not come right after the broker's (whose in-flight requests must end on their own)."""
TRANSITIONAL = {"pending", "starting", "pausing", "resuming", "stopping"}
DEPENDENCY_DOWN = {502, 503, 504}
REQUEST_TIMEOUT_S = 60.0
"""Client timeout of every request: the server's own bus timeouts are 10 s."""


def supervised_pids(suite: Suite) -> dict[str, int]:
    """The supervisor's children by service name (``python -m dovecote.services.cli NAME``)."""
    pids: dict[str, int] = {}
    root = suite.proc.pid
    for task in Path(f"/proc/{root}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in map(int, children):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z":
                continue
            args = [a.decode() for a in argv if a]
            if "dovecote.services.cli" in args:
                pids[args[args.index("dovecote.services.cli") + 1]] = pid
    return pids


def error_shape_ok(body: bytes) -> bool:
    """The documented error body: ``{"error": {"code": str, "message": str}}``."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    err = doc.get("error") if isinstance(doc, dict) else None
    return (isinstance(err, dict) and isinstance(err.get("code"), str)
            and isinstance(err.get("message"), str))


@dataclass
class Outcome:
    """One request and how it ended."""

    op: str
    started: float
    ended: float
    status: int | None = None
    """The HTTP status, or None when no answer came (``error`` says why)."""
    code: str = ""
    error: str = ""
    shape_ok: bool = True

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def hung(self) -> bool:
        return self.error.startswith("timeout")

    def __str__(self) -> str:
        what = f"{self.status} {self.code}" if self.status is not None else self.error
        return f"{self.op} at +{self.started:.1f}s ({self.ended - self.started:.1f}s): {what}"


@dataclass
class Fault:
    """One SIGKILL and the recovery that followed."""

    service: str
    old_pid: int
    killed_at: float
    new_pid: int | None = None
    healthy_at: float | None = None

    @property
    def recovery_s(self) -> float | None:
        return None if self.healthy_at is None else self.healthy_at - self.killed_at


@dataclass
class Ledger:
    outcomes: list[Outcome] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    """Capsules whose create got a 2xx."""
    destroyed: list[str] = field(default_factory=list)
    """Capsules whose destroy got a 2xx."""
    settled: dict[str, list[str]] = field(default_factory=lambda: {"pause": [], "resume": []})
    """Capsules whose pause (resume) got a 2xx and that then became paused (running)."""
    written: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """(capsule, path) -> content of every 2xx file write."""
    wrong: list[str] = field(default_factory=list)
    """2xx answers whose content was wrong (an exec's output...)."""


class SseClient:
    """An event stream client that reconnects with ``Last-Event-ID``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.first_position: int | None = None
        self.last_id = 0
        self.ids: list[int] = []
        self.duplicates: list[int] = []
        self.connects = 0
        self.errors: list[str] = []


class FaultRun:
    """Load and faults against ``suite``, as the team of ``key``."""

    def __init__(self, suite: Suite, key: str, capsules: list[str], *, max_creates: int = 3,
                 sse_clients: int = 2, log: Callable[[str], None] = print) -> None:
        self.suite = suite
        self.key = key
        self.capsules = capsules
        self.max_creates = max_creates
        self.sse_clients = [SseClient(f"sse{i}") for i in range(sse_clients)]
        self.ledger = Ledger()
        self.faults: list[Fault] = []
        self.log = log
        self.t0 = time.monotonic()
        self.stop_load = trio.Event()
        self.creates_done = trio.Event()
        self.faults_done = trio.Event()
        self.http: httpx.AsyncClient | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- requests -----------------------------------------------------------------

    async def send(self, op: str, method: str, path: str, **kw: Any) -> tuple[Outcome, httpx.Response | None]:
        """One request through a fresh-enough connection; logged whatever happens."""
        assert self.http is not None
        out = Outcome(op=op, started=self.now(), ended=0.0)
        response = None
        try:
            response = await self.http.request(method, path, **kw)
            out.status = response.status_code
            if response.status_code >= 400:
                out.shape_ok = error_shape_ok(response.content)
                if out.shape_ok:
                    out.code = response.json()["error"]["code"]
        except httpx.TimeoutException as exc:
            out.error = f"timeout: {type(exc).__name__}"
        except httpx.TransportError as exc:
            out.error = f"transport: {type(exc).__name__}: {exc}"
        out.ended = self.now()
        self.ledger.outcomes.append(out)
        return out, response

    # -- load ---------------------------------------------------------------------

    async def exec_loop(self, capsule_id: str) -> None:
        n = 0
        while not self.stop_load.is_set():
            n += 1
            token = f"{capsule_id[-6:]}-{n}-{secrets.token_hex(3)}"
            out, response = await self.send("exec", "POST", f"/v1/capsules/{capsule_id}/exec",
                                            json={"cmd": f"echo {token}"})
            if out.ok and response is not None and response.json().get("stdout") != token + "\n":
                self.ledger.wrong.append(f"exec {token}: {response.text[:200]}")
            await trio.sleep(0.2 if out.ok else 0.5)

    async def write_loop(self, capsule_id: str) -> None:
        n = 0
        while not self.stop_load.is_set():
            n += 1
            path = f"/tmp/faults-{n}.txt"
            content = secrets.token_hex(16 + n % 64).encode()
            out, _ = await self.send("write", "POST", f"/v1/capsules/{capsule_id}/files/write",
                                     data={"path": path}, files={"file": ("f", content)})
            if out.ok:
                self.ledger.written[(capsule_id, path)] = content
            await trio.sleep(0.3 if out.ok else 0.5)

    async def create_loop(self) -> None:
        """Create, wait for ``running``, (every other time) pause and resume, destroy.

        One capsule at a time, at most ``max_creates``, until the faults are over.
        """
        made = 0
        try:
            while made < self.max_creates and not self.faults_done.is_set():
                out, response = await self.send("create", "POST", "/v1/capsules",
                                                json={"template": "minimal"})
                if not (out.ok and response is not None):
                    await trio.sleep(1)
                    continue
                made += 1
                capsule_id = response.json()["id"]
                self.ledger.created.append(capsule_id)
                status = await self._wait_status(capsule_id, {"running", "error", "missing"}, 300)
                if status == "running" and made % 2 == 0:
                    for action, settled in (("pause", "paused"), ("resume", "running")):
                        if await self._until_accepted(action, "POST",
                                                      f"/v1/capsules/{capsule_id}/{action}"):
                            got = await self._wait_status(capsule_id, {settled, "error", "missing"}, 300)
                            if got == settled:
                                self.ledger.settled[action].append(capsule_id)
                if await self._until_accepted("destroy", "DELETE", f"/v1/capsules/{capsule_id}"):
                    self.ledger.destroyed.append(capsule_id)
                await self._wait_status(capsule_id, {"stopped", "error", "missing"}, 120)
                await trio.sleep(1)
        finally:
            self.creates_done.set()

    async def _until_accepted(self, op: str, method: str, path: str) -> bool:
        """Send until a 2xx (True) or a 4xx (False); a 5xx or no answer is asked again."""
        while True:
            out, _ = await self.send(op, method, path)
            if out.ok:
                return True
            if out.status is not None and out.status < 500:
                return False
            await trio.sleep(1)

    async def _wait_status(self, capsule_id: str, statuses: set[str], timeout_s: float) -> str:
        with trio.move_on_after(timeout_s):
            while True:
                out, response = await self.send("get", "GET", f"/v1/capsules/{capsule_id}")
                if out.ok and response is not None and response.json()["status"] in statuses:
                    return str(response.json()["status"])
                await trio.sleep(0.5)
        return "timeout"

    async def sse_loop(self, client: SseClient) -> None:
        assert self.http is not None
        # The stream writes a keepalive every few seconds (the suite's
        # DOVECOTE_SSE_KEEPALIVE_S): a longer silence is a hang.
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=20.0)
        while not self.stop_load.is_set():
            headers = {"Last-Event-ID": str(client.last_id)} if client.first_position is not None else {}
            out = Outcome(op="sse", started=self.now(), ended=0.0)
            try:
                async with self.http.stream("GET", "/v1/events/stream", headers=headers,
                                            timeout=timeout) as response:
                    out.status = response.status_code
                    if response.status_code != 200:
                        body = await response.aread()
                        out.shape_ok = error_shape_ok(body)
                        out.code = json.loads(body)["error"]["code"] if out.shape_ok else ""
                    else:
                        client.connects += 1
                        await self._read_sse(client, response)
                        out.error = "transport: stream ended"
            except httpx.TimeoutException as exc:
                out.error = f"timeout: {type(exc).__name__}"
            except (httpx.TransportError, httpx.StreamError) as exc:
                out.error = f"transport: {type(exc).__name__}: {exc}"
            out.ended = self.now()
            if out.status != 200 or out.hung:
                self.ledger.outcomes.append(out)
            elif out.error and not self.stop_load.is_set():
                # A stream cut while the load runs: an "error" frame or a closed
                # connection; logged so the window check sees it.
                self.ledger.outcomes.append(out)
            await trio.sleep(0.2)

    async def _read_sse(self, client: SseClient, response: httpx.Response) -> None:
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if self.stop_load.is_set() and client.last_id >= self.caught_up_to:
                return
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
                continue
            if not fields:
                continue
            frame, fields = fields, {}
            kind = frame.get("event", "message")
            if kind == "connected":
                if client.first_position is None:
                    client.first_position = client.last_id = int(frame["id"])
                continue
            if kind == "error":
                client.errors.append(frame.get("data", ""))
                return
            if "id" not in frame:
                continue
            event_id = int(frame["id"])
            if event_id <= client.last_id:
                client.duplicates.append(event_id)
            else:
                client.ids.append(event_id)
                client.last_id = event_id

    caught_up_to = 2**62

    # -- faults -------------------------------------------------------------------

    async def healthz(self) -> int:
        try:
            async with httpx.AsyncClient(base_url=self.suite.url, timeout=3.0) as fresh:
                return (await fresh.get("/healthz")).status_code
        except httpx.HTTPError:
            return 0

    async def kill(self, service: str, *, limit_s: float = 10.0) -> Fault:
        """SIGKILL ``service``; wait (up to ``limit_s`` + a margin) for its successor and a 200."""
        old = supervised_pids(self.suite)[service]
        fault = Fault(service=service, old_pid=old, killed_at=self.now())
        os.kill(old, signal.SIGKILL)
        self.faults.append(fault)
        with trio.move_on_after(limit_s + 20):
            while True:
                await trio.sleep(0.1)
                pid = supervised_pids(self.suite).get(service)
                if pid is None or pid == old:
                    continue
                fault.new_pid = pid
                if await self.healthz() == 200:
                    fault.healthy_at = self.now()
                    break
        self.log(f"killed {service} ({old}) at +{fault.killed_at:.1f}s: "
                 f"back as {fault.new_pid}, healthy after "
                 f"{'never' if fault.recovery_s is None else f'{fault.recovery_s:.1f}s'}")
        return fault

    async def kill_each(self, services: tuple[str, ...] = KILLED_IN_TURN, *, rounds: int = 1,
                        spacing_s: float = 5.0, limit_s: float = 10.0) -> None:
        for _ in range(rounds):
            for service in services:
                await trio.sleep(spacing_s)
                await self.kill(service, limit_s=limit_s)
        await trio.sleep(spacing_s)

    # -- the run ------------------------------------------------------------------

    async def run(self, services: tuple[str, ...] = KILLED_IN_TURN, *, rounds: int = 1,
                  spacing_s: float = 5.0, limit_s: float = 10.0) -> list[str]:
        """Load, kill each of ``services`` in turn, settle; the broken promises (see :meth:`verdict`)."""
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=self.suite.url, headers={"X-API-Key": self.key},
                                     timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
            self.http = http
            async with trio.open_nursery() as nursery:
                for client in self.sse_clients:
                    nursery.start_soon(self.sse_loop, client)
                for capsule_id in self.capsules:
                    nursery.start_soon(self.exec_loop, capsule_id)
                    nursery.start_soon(self.write_loop, capsule_id)
                nursery.start_soon(self.create_loop)
                await trio.sleep(spacing_s)  # the load runs before the first fault
                await self.kill_each(services, rounds=rounds, spacing_s=spacing_s, limit_s=limit_s)
                self.faults_done.set()
                with trio.move_on_after(300):
                    await self.creates_done.wait()
                self.stop_load.set()
                await self.settle()
                nursery.cancel_scope.cancel()
            return await self.verdict(limit_s=limit_s)

    async def settle(self) -> None:
        """Wait (bounded) for no transitional capsule and for the SSE clients to catch up."""
        with trio.move_on_after(120):
            while True:
                out, response = await self.send("list", "GET", "/v1/capsules")
                if out.ok and response is not None and not any(
                        c["status"] in TRANSITIONAL for c in response.json()):
                    break
                await trio.sleep(1)
        events = await self.team_events()
        newest = max((e["id"] for e in events), default=0)
        self.caught_up_to = newest
        with trio.move_on_after(60):
            while any(c.last_id < newest for c in self.sse_clients):  # noqa: ASYNC110
                await trio.sleep(0.5)

    async def team_events(self) -> list[dict[str, Any]]:
        """The whole event log of the team (through the API: a stream replayed from 0,
        read until its first keepalive: the replay is written at once)."""
        assert self.http is not None
        events: list[dict[str, Any]] = []
        fields: dict[str, str] = {}
        with trio.fail_after(60):
            async with self.http.stream("GET", "/v1/events/stream", headers={"Last-Event-ID": "0"},
                                        timeout=httpx.Timeout(30.0, read=30.0)) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith(":"):
                        break
                    if line:
                        name, _, value = line.partition(":")
                        fields[name] = value[1:] if value.startswith(" ") else value
                        continue
                    frame, fields = fields, {}
                    if frame.get("event") in (None, "connected", "error") or "id" not in frame:
                        continue
                    events.append({"id": int(frame["id"]), **json.loads(frame["data"])})
        return events

    # -- the verdict ----------------------------------------------------------------

    def in_fault_window(self, out: Outcome, slack_s: float) -> bool:
        for fault in self.faults:
            end = fault.healthy_at if fault.healthy_at is not None else self.now()
            if out.ended >= fault.killed_at - 0.5 and out.started <= end + slack_s:
                return True
        return False

    async def verdict(self, *, limit_s: float = 10.0, slack_s: float = 10.0,
                      slow_s: float = 10.0) -> list[str]:
        """Every broken promise, one line each (empty: all held).

        ``slow_s``: every request of the load (an ``echo``, a small file, a 202)
        is answered in well under a second when nothing fails; one answered
        (even with an error) after longer waited on something that was gone.
        """
        problems: list[str] = []
        for fault in self.faults:
            if fault.recovery_s is None or fault.recovery_s > limit_s:
                problems.append(f"{fault.service} was not back and healthy within {limit_s:.0f}s "
                                f"(recovery: {fault.recovery_s})")
        for out in self.ledger.outcomes:
            if out.hung:
                problems.append(f"hung: {out}")
            elif out.op != "sse" and out.ended - out.started > slow_s:
                problems.append(f"answered after more than {slow_s:.0f}s: {out}")
            elif out.status is not None and out.status >= 400:
                if not out.shape_ok:
                    problems.append(f"error not in the documented shape: {out}")
                elif out.status not in DEPENDENCY_DOWN:
                    problems.append(f"unexpected error: {out}")
                elif not self.in_fault_window(out, slack_s):
                    problems.append(f"error away from any fault: {out}")
            elif out.error and not self.in_fault_window(out, slack_s):
                problems.append(f"connection failure away from any fault: {out}")
        problems += [f"wrong answer: {w}" for w in self.ledger.wrong]
        # Capsules: none lost, none transitional, the long-lived ones running.
        out, response = await self.send("list", "GET", "/v1/capsules")
        assert out.ok and response is not None, out
        listed = {c["id"]: c["status"] for c in response.json()}
        for capsule_id in self.ledger.created:
            if capsule_id not in listed:
                problems.append(f"capsule {capsule_id} (created, 202) is not listed")
        for capsule_id, status in listed.items():
            if status in TRANSITIONAL:
                problems.append(f"capsule {capsule_id} left {status}")
        for capsule_id in self.capsules:
            if listed.get(capsule_id) != "running":
                problems.append(f"long-lived capsule {capsule_id} is {listed.get(capsule_id)}")
        # Files: every 2xx write is there.
        for (capsule_id, path), content in self.ledger.written.items():
            out, response = await self.send("read", "POST", f"/v1/capsules/{capsule_id}/files/read",
                                            json={"path": path})
            if not out.ok or response is None or response.content != content:
                problems.append(f"file {path} on {capsule_id} (written, 204) reads back as {out}")
        # Events: once each, no gaps.
        events = await self.team_events()
        ids = [e["id"] for e in events]
        if len(ids) != len(set(ids)):
            problems.append("the log lists an id twice")
        per = Counter((e["event"], e["resource"]["id"]) for e in events)
        for capsule_id in self.ledger.created:
            if per[("capsule.create", capsule_id)] != 1:
                problems.append(f"capsule.create of {capsule_id} logged "
                                f"{per[('capsule.create', capsule_id)]} times")
        for capsule_id in self.ledger.destroyed:
            if per[("capsule.destroy", capsule_id)] != 1:
                problems.append(f"capsule.destroy of {capsule_id} logged "
                                f"{per[('capsule.destroy', capsule_id)]} times")
        for action in ("pause", "resume"):
            for capsule_id in self.ledger.settled[action]:
                if per[(f"capsule.{action}", capsule_id)] != 1:
                    problems.append(f"capsule.{action} of {capsule_id} logged "
                                    f"{per[(f'capsule.{action}', capsule_id)]} times")
        for client in self.sse_clients:
            if client.duplicates:
                problems.append(f"{client.name} got ids again: {client.duplicates[:10]}")
            start = client.first_position or 0
            missed = sorted(set(i for i in ids if i > start) - set(client.ids))
            if missed:
                problems.append(f"{client.name} missed {len(missed)} events: {missed[:10]}")
        return problems

    def timeline(self) -> str:
        """The failed requests, consecutive ones of a kind merged: when and how they failed."""
        spans: list[list[Any]] = []
        for out in sorted(self.ledger.outcomes, key=lambda o: o.started):
            if out.ok:
                continue
            what = f"{out.status} {out.code}" if out.status is not None else out.error[:90]
            last = next((s for s in reversed(spans) if s[0] == out.op), None)
            if last is not None and last[1] == what and out.started - last[3] < 3:
                last[3], last[4] = out.ended, last[4] + 1
            else:
                spans.append([out.op, what, out.started, out.ended, 1])
        kills = [(f.killed_at, f"-- kill {f.service}") for f in self.faults]
        rows = [(s[2], f"{s[0]:8} +{s[2]:.1f}..{s[3]:.1f}s x{s[4]}: {s[1]}") for s in spans]
        return "\n".join(text for _, text in sorted(kills + rows))

    def summary(self) -> str:
        counts = Counter((o.op, "2xx" if o.ok else (str(o.status) if o.status else "no answer"))
                         for o in self.ledger.outcomes)
        lines = [f"  {op:8} {result:10} {n}" for (op, result), n in sorted(counts.items())]
        recov = [f"{f.service}={f.recovery_s:.1f}s" if f.recovery_s is not None else f"{f.service}=never"
                 for f in self.faults]
        sse = [f"{c.name}: {len(c.ids)} events, {c.connects} connects" for c in self.sse_clients]
        return "\n".join([f"recoveries: {' '.join(recov)}", *lines,
                          f"created {len(self.ledger.created)}, destroyed {len(self.ledger.destroyed)}, "
                          f"files written {len(self.ledger.written)}", *sse])


def start_faults_suite(prefix: str) -> tuple[Suite, Path]:
    """A ``dovecote up`` with VMs, in a fresh directory QEMU may read."""
    top = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    top.chmod(0o755)
    Path(IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    suite = Suite(data_dir=top / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
        "DOVECOTE_VM_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S),
        # A keepalive every 3 s: a silent stream for longer is a hang.
        "DOVECOTE_SSE_KEEPALIVE_S": "3"})
    return suite, top


def running_capsules(suite: Suite, count: int) -> tuple[str, list[str]]:
    """An API key and ``count`` running ``minimal`` capsules of its team."""
    (suite.data_dir).chmod(0o755)
    api = api_client(suite, "Faye")
    key = str(api.http.headers["X-API-Key"])
    ids: list[str] = []
    deadline = time.monotonic() + 1800  # a first build of the image takes minutes
    # Creates restore the built-in template once it is ready (about a second
    # under TCG, where a cold boot takes a minute or more on a busy machine).
    while get_json(suite.url + "/healthz")[1]["services"]["vmmgr"].get("details", {}).get(
            "template") != "ready":
        assert time.monotonic() < deadline, "the built-in template was never ready"
        time.sleep(3)
    while len(ids) < count:
        response = api.post("/v1/capsules", {"template": "minimal"})
        if response.status_code == 503 and time.monotonic() < deadline:
            time.sleep(3)
            continue
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
        wait_status(api, ids[-1], "running")
    return key, ids
