"""Agent runtime benchmarks: claim → complete round trips and channel send → recv latency.

Run: ``.venv/bin/python benchmarks/agents.py [--runs 400] [--agents 20] [--messages 200]``
(about a minute). Starts its own ``dovecote up`` (no VMs), signs up an
operator, creates a workspace, agent sessions and queued runs over
``/v1/agent/*``, then, as agents over ``/api/agent/*`` (httpx over Trio, one
keep-alive connection per agent), prints:

* claim → complete round trips per second with 1 agent and with ``--agents``
  agents claiming concurrently: each round trip is ``claim-next`` then
  ``complete`` of the claimed run (two HTTP requests, two transactions);
* channel send → recv latency: a reader long-polls ``recv?wait=true`` while a
  writer sends one message at a time; the time from sending to the reader's
  answer, p50 and p99 in ms.

The agents are this process's tasks, so on a small machine the numbers
include the clients' own HTTP work, which shares the CPU with the suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.agents.helpers import Agent, Operator  # noqa: E402
from tests.helpers.suite import Suite  # noqa: E402


def queue_runs(ops: Operator, ws: str, count: int) -> None:
    task = ops.task(ws, "benchmark")
    for _ in range(count):
        ops.run(task)


async def claim_complete(suite: Suite, agents: list[Agent], runs: int) -> float:
    """Round trips per second: the agents claim and complete until ``runs`` are done."""
    done = 0

    async def work(agent: Agent) -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=suite.url, headers=agent.headers(), timeout=30) as client:
            while done < runs:
                r = await client.post("/api/agent/tasks/claim-next", json={"lease_seconds": 60})
                if r.status_code == 204:
                    return
                assert r.status_code == 200, r.text
                run_id = r.json()["claim"]["run"]["id"]
                r = await client.post(f"/api/agent/tasks/{run_id}/complete", json={"result": {"ok": True}})
                assert r.status_code == 200, r.text
                done += 1

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for agent in agents:
            nursery.start_soon(work, agent)
    return done / (time.perf_counter() - began)


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
    async with (
        httpx.AsyncClient(base_url=suite.url, headers=writer.headers(), timeout=30) as w,
        httpx.AsyncClient(base_url=suite.url, headers=reader.headers(), timeout=30) as r,
    ):
        for i in range(count):
            got: dict[str, float] = {}

            async def read(
                i: int = i,
                got: dict[str, float] = got,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                task_status.started()
                resp = await r.get(f"/api/agent/channels/{channel['id']}/recv", params={"wait": "true"})
                got["at"] = time.perf_counter()
                assert resp.status_code == 200 and resp.json()["messages"][0]["body"] == i, resp.text

            async with trio.open_nursery() as nursery:
                await nursery.start(read)
                await trio.sleep(0.01)  # the long poll is waiting
                sent = time.perf_counter()
                resp = await w.post(
                    f"/api/agent/channels/{channel['id']}/send", json={"metadata": md, "body": i}
                )
                assert resp.status_code == 202, resp.text
            latencies.append((got["at"] - sent) * 1000)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_LOG_LEVEL": "warning"})
    try:
        suite.wait_ready()
        ops = Operator(suite, "Bench")
        ws = ops.workspace()
        agents = [ops.session(ws, f"agent-{i}") for i in range(args.agents)]
        for label, crew in (("1 agent", agents[:1]), (f"{args.agents} agents", agents)):
            queue_runs(ops, ws, args.runs)
            rate = trio.run(claim_complete, suite, crew, args.runs)
            print(f"claim → complete, {label}: {rate:.0f} round trips/s ({args.runs} runs)")
        run = ops.run(ops.task(ws, "channel"))
        channel = ops.get(f"/v1/agent/runs/{run['id']}")["run"]["coordination_channel"]
        lat = sorted(trio.run(send_recv, suite, agents[0], agents[1], channel, args.messages))
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"channel send → recv: p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms "
            f"({len(lat)} messages)"
        )
    finally:
        suite.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
