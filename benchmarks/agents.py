"""Agent runtime benchmarks: claim → complete round trips and channel send → recv latency.

Run: ``.venv/bin/python benchmarks/agents.py [--runs 2000] [--agents 20] [--messages 200]``
(about a minute; 2000 runs take about 4 s with 20 agents, so the start and the last
round, when fewer agents are left, weigh little). Starts its own ``dovecote up`` (no VMs), signs up an
operator, creates a workspace, agent sessions and queued runs over
``/v1/agent/*``, then, as agents over ``/api/agent/*`` (httpx over Trio, one
keep-alive connection per agent), prints:

* claim → complete round trips per second with 1 agent and with ``--agents``
  agents claiming concurrently: each round trip is ``claim-next`` then
  ``complete`` of the claimed run (two HTTP requests, two transactions);
* channel send → recv latency: a reader long-polls ``recv?wait=true`` while a
  writer sends one message at a time; the time from sending to the reader's
  answer, p50 and p99 in ms.

The agents are this process's tasks, so on a small machine the clients'
own HTTP work shares the CPU with the suite. To keep that share small they
speak HTTP/1.1 themselves (:class:`Http`: one keep-alive TCP connection per
agent, a request written in one ``send``, the answer read by its
``Content-Length``) instead of through httpx, whose per-request work was as
large as the gateway's. The server side is the real one: ``dovecote up``'s
gateway over TCP, the bus, the agents service and PostgreSQL.

``--cpu`` also prints the CPU time each process of the suite (and this
client) spent per claim → complete round trip, from ``/proc``: it moves
much less than the rate when other work shares the machine (but still
10-30% between a load of 3 and of 6: caches and cores are shared); and,
from the agents service's metrics, how many lease statements shared a
transaction (its group commit, ``services/agents/batch.py``) and how many
lifecycle events shared a notifier batch.

To compare with an older commit on the same load, extract it as a
``dovecote`` package and run the two alternately (the suite's processes
inherit ``PYTHONPATH``, which wins over the editable install)::

    mkdir -p /tmp/old/dovecote && touch /tmp/old/dovecote/__init__.py
    git archive OLD bus gateway libs notifier recorder services vmmgr | tar -x -C /tmp/old/dovecote
    PYTHONPATH=/tmp/old .venv/bin/python benchmarks/agents.py --cpu --runs 800
    .venv/bin/python benchmarks/agents.py --cpu --runs 800

The ratio of two processes' CPU (the gateway's to the agents service's,
when only one of them changed) cancels most of the load's effect.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dovecote.bus.messages.metrics import ScrapeMetrics  # noqa: E402
from dovecote.services.client import open_cli_bus  # noqa: E402
from tests.agents.helpers import Agent, Operator  # noqa: E402
from tests.helpers.suite import Suite  # noqa: E402


class Http:
    """One keep-alive HTTP/1.1 connection speaking for one agent (answers read by Content-Length)."""

    def __init__(self, stream: trio.SocketStream, host: str, headers: dict[str, str]) -> None:
        self.stream = stream
        self.host = host
        self.closing = False
        self.fixed = f"Host: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.buffer = bytearray()

    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> Http:
        host = url.split("://", 1)[1]
        name, _, port = host.partition(":")
        return cls(await trio.open_tcp_stream(name, int(port)), host, headers)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request; its status and its decoded JSON body (None when empty)."""
        if self.closing:  # hypercorn ends a keep-alive connection after 1000 requests
            await self.stream.aclose()
            name, _, port = self.host.partition(":")
            self.stream, self.closing, self.buffer = (
                await trio.open_tcp_stream(name, int(port)),
                False,
                bytearray(),
            )
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\n{self.fixed}"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        await self.stream.send_all(head.encode() + data)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value)
            elif key.strip().lower() == "connection":
                self.closing = value.strip().lower() == "close"
            elif key.strip().lower() == "transfer-encoding":
                raise AssertionError("chunked answers are not expected here")
        while len(self.buffer) < length:
            await self._fill()
        raw = bytes(self.buffer[:length])
        del self.buffer[:length]
        return status, (json.loads(raw) if raw else None)

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise AssertionError("the gateway closed the connection")
        self.buffer += chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


def queue_runs(ops: Operator, ws: str, count: int) -> None:
    task = ops.task(ws, "benchmark")
    for _ in range(count):
        ops.run(task)


async def claim_complete(suite: Suite, agents: list[Agent], runs: int) -> float:
    """Round trips per second: the agents claim and complete until ``runs`` are done.

    The agents' connections are opened before the clock starts: the rate is the
    loop's, not the connects'.
    """
    done = 0

    async def work(http: Http) -> None:
        nonlocal done
        while done < runs:
            status, answer = await http.request(
                "POST", "/api/agent/tasks/claim-next", {"lease_seconds": 60}
            )
            if status == 204:
                return
            assert status == 200, answer
            run_id = answer["claim"]["run"]["id"]
            status, answer = await http.request(
                "POST", f"/api/agent/tasks/{run_id}/complete", {"result": {"ok": True}}
            )
            assert status == 200 and answer["lease"]["status"] == "completed", answer
            done += 1

    conns: list[Http] = []
    try:
        with trio.fail_after(60):
            for agent in agents:
                conns.append(await Http.open(suite.url, agent.headers()))
        began = time.perf_counter()
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for http in conns:
                    nursery.start_soon(work, http)
        return done / (time.perf_counter() - began)
    finally:
        for http in conns:
            await http.aclose()


async def send_recv(
    suite: Suite, writer: Agent, reader: Agent, channel: dict[str, Any], count: int
) -> list[float]:
    md = {
        "task_id": channel["task_id"],
        "run_id": channel["run_id"],
        "coordination_channel_id": channel["id"],
        "correlation_id": "bench",
        "message_kind": "status",
    }
    latencies: list[float] = []
    w = await Http.open(suite.url, writer.headers())
    r = await Http.open(suite.url, reader.headers())
    try:
        for i in range(count):
            got: dict[str, float] = {}

            async def read(
                i: int = i,
                got: dict[str, float] = got,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                task_status.started()
                status, answer = await r.request("GET", f"/api/agent/channels/{channel['id']}/recv?wait=true")
                got["at"] = time.perf_counter()
                assert status == 200 and answer["messages"][0]["body"] == i, answer

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await nursery.start(read)
                    await trio.sleep(0.01)  # the long poll is waiting
                    sent = time.perf_counter()
                    status, answer = await w.request(
                        "POST", f"/api/agent/channels/{channel['id']}/send", {"metadata": md, "body": i}
                    )
                    assert status == 202, answer
            latencies.append((got["at"] - sent) * 1000)
    finally:
        await w.aclose()
        await r.aclose()
    return latencies


# -- CPU per round trip, from /proc -------------------------------------------------------


def _processes() -> dict[int, tuple[int, float, str]]:
    """Every process: (parent pid, CPU seconds used, command line)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, args)
    return found


def suite_cpu(suite: Suite) -> dict[str, float]:
    """CPU seconds used so far by each service of ``suite`` (and its PostgreSQL), by name."""
    procs = _processes()
    # The embedded PostgreSQL is started detached: its postmaster names the data dir.
    postmasters = [pid for pid, (_, _, args) in procs.items() if f"-D {suite.data_dir}/postgres" in args]
    used: dict[str, float] = {"postgres": sum(procs[pid][1] for pid in postmasters)}
    todo = [(suite.proc.pid, "")] + [(pid, "postgres") for pid in postmasters]
    while todo:
        parent, label = todo.pop()
        for pid, (ppid, cpu, args) in procs.items():
            if ppid != parent:
                continue
            name = label or (
                args.split("services.cli ", 1)[1].split()[0] if "services.cli " in args else "other"
            )
            used[name] = used.get(name, 0.0) + cpu
            todo.append((pid, name))
    return used


def print_cpu(before: dict[str, float], after: dict[str, float], client_s: float, runs: int) -> None:
    per = {name: (after[name] - before.get(name, 0.0)) * 1000 / runs for name in after}
    per["(this client)"] = client_s * 1000 / runs
    for name, ms in sorted(per.items(), key=lambda item: -item[1]):
        if ms >= 0.01:
            print(f"    {name:16s} {ms:6.2f} ms CPU per round trip")
    total = sum(per.values())
    print(f"    {'total':16s} {total:6.2f} ms: at most {2000 / total:.0f} round trips/s on 2 idle cores")


BATCH_COUNTERS = (
    "dovecote_agents_lease_batches_total",
    "dovecote_agents_lease_statements_total",
    "dovecote_agents_event_batches_total",
    "dovecote_agents_events_sent_total",
)


def agents_counters(suite: Suite) -> dict[str, float]:
    """The agents service's batching counters (:data:`BATCH_COUNTERS`), from its metrics."""

    async def scrape() -> dict[str, float]:
        async with open_cli_bus(suite.data_dir) as bus:
            reply = await bus.request("agents", ScrapeMetrics(), timeout=10)
        return {
            sample.name: sample.value
            for family in reply.families
            for sample in family.samples
            if sample.name in BATCH_COUNTERS
        }

    return trio.run(scrape)


def print_batching(before: dict[str, float], after: dict[str, float]) -> None:
    got = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in BATCH_COUNTERS}
    leases, events = got["dovecote_agents_lease_batches_total"], got["dovecote_agents_event_batches_total"]
    if leases:
        print(f"    {got['dovecote_agents_lease_statements_total'] / leases:.1f} lease statements per "
              f"transaction ({leases:.0f} transactions)")
    if events:
        print(f"    {got['dovecote_agents_events_sent_total'] / events:.1f} lifecycle events per "
              f"notifier batch ({events:.0f} batches)")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--cpu", action="store_true", help="print CPU time per round trip by process")
    args = parser.parse_args()
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_LOG_LEVEL": "warning"})
    try:
        suite.wait_ready()
        ops = Operator(suite, "Bench")
        ws = ops.workspace()
        agents = [ops.session(ws, f"agent-{i}") for i in range(args.agents)]
        for label, crew in (("1 agent", agents[:1]), (f"{args.agents} agents", agents)):
            queue_runs(ops, ws, args.runs)
            counted = agents_counters(suite) if args.cpu else {}
            before, own = suite_cpu(suite), _own_cpu()
            rate = trio.run(claim_complete, suite, crew, args.runs)
            time.sleep(1.0)  # the lifecycle events of the last round trips reach the notifier
            after, own = suite_cpu(suite), _own_cpu() - own
            print(f"claim → complete, {label}: {rate:.0f} round trips/s ({args.runs} runs)")
            if args.cpu:
                print_cpu(before, after, own, args.runs)
                print_batching(counted, agents_counters(suite))
        run = ops.run(ops.task(ws, "channel"))
        channel = ops.get(f"/v1/agent/runs/{run['id']}")["run"]["coordination_channel"]
        lat = sorted(trio.run(send_recv, suite, agents[0], agents[1], channel, args.messages))
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"channel send → recv: p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms "
            f"({len(lat)} messages)"
        )
        print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    finally:
        suite.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
