"""Lifecycle event stream benchmarks: end-to-end latency and SSE fan-out.

Run: ``.venv/bin/python benchmarks/events.py [--events 200] [--clients 50] [--burst 500]``
(about half a minute). Starts its own ``dovecote up`` (no VMs), signs up an
account with an API key and prints:

* end-to-end latency, one event at a time: :class:`RecordEvent` sent to the
  notifier over the suite's bus (as vmmgr or auth does) → the frame parsed by
  an SSE client of ``GET /v1/events/stream`` over HTTP; p50 and p99 in ms,
  and the bus round trip of the RecordEvent alone for comparison;
* fan-out: ``--clients`` SSE clients on the same team stream while
  ``--burst`` events are recorded by 8 concurrent publishers; frames delivered
  per second over all clients (clients * events / time from the first record
  to the last client done), the rate events were recorded at (the notifier
  appends one at a time, which bounds the live rate), and how long after the
  last record the last client had everything.

The clients are this process's tasks (httpx over Trio), so on a small
machine the numbers include the clients' own parsing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dovecote.bus.messages.events import EventRecorded, RecordEvent  # noqa: E402
from dovecote.services.client import open_cli_bus  # noqa: E402
from tests.events.fakes import capsule_event  # noqa: E402
from tests.events.helpers import SSE, open_sse, record_many  # noqa: E402
from tests.helpers.suite import Suite  # noqa: E402
from tests.hosts.helpers import create_admin, regular_user  # noqa: E402


def _ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _latency(suite: Suite, key: str, team_id: str, n: int) -> tuple[list[float], list[float]]:
    """(end-to-end seconds, RecordEvent round trip seconds) for ``n`` events one at a time."""
    end_to_end: list[float] = []
    round_trip: list[float] = []
    async with open_cli_bus(suite.data_dir) as bus, open_sse(suite, key=key) as sse:
        assert (await sse.frame()).event == "connected"
        for i in range(n + 5):  # 5 warm-ups
            event = capsule_event(f"lat{i}")
            began = time.perf_counter()
            reply = await bus.request("notifier", RecordEvent(team_id=team_id, event=event), timeout=10)
            answered = time.perf_counter()
            assert isinstance(reply, EventRecorded), reply
            frame = await sse.frame()
            arrived = time.perf_counter()
            assert frame.id == reply.id, (frame, reply)
            if i >= 5:
                end_to_end.append(arrived - began)
                round_trip.append(answered - began)
    return end_to_end, round_trip


async def _fan_out(suite: Suite, key: str, team_id: str, clients: int,
                   burst: int) -> tuple[float, float, float]:
    """(frames delivered per second over all clients, events recorded per second,
    seconds from the last event recorded to the last client done)."""
    done = 0
    all_done = trio.Event()
    connected = 0
    all_connected = trio.Event()

    async def client() -> None:
        nonlocal done, connected
        async with open_sse(suite, key=key) as sse:
            assert (await sse.frame()).event == "connected"
            connected += 1
            if connected == clients:
                all_connected.set()
            await _read(sse, burst)
        done += 1
        if done == clients:
            all_done.set()

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
        await all_connected.wait()
        began = time.perf_counter()
        await record_many(suite, team_id, [capsule_event(f"fan{i}") for i in range(burst)])
        recorded = time.perf_counter() - began
        await all_done.wait()
        elapsed = time.perf_counter() - began
    return clients * burst / elapsed, burst / recorded, elapsed - recorded


async def _read(sse: SSE, count: int) -> None:
    last = 0
    for _ in range(count):
        frame = await sse.frame()
        assert frame.id is not None and frame.id > last, "out of order or duplicated"
        last = frame.id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200, help="events for the latency run")
    parser.add_argument("--clients", type=int, default=50, help="SSE clients for the fan-out run")
    parser.add_argument("--burst", type=int, default=500, help="events for the fan-out run")
    args = parser.parse_args()
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000"})
    try:
        suite.wait_ready()
        create_admin(suite, "Benchadmin")  # the installation's first account
        browser, login = regular_user(suite, "Bench")
        created = browser.post("/v1/api-keys", {"name": "bench"})
        assert created.status_code == 201, created.text
        key, team_id = created.json()["key"], login["team_id"]

        end_to_end, round_trip = trio.run(_latency, suite, key, team_id, args.events)
        print(f"RecordEvent -> SSE client ({args.events} events, one at a time): "
              f"p50 {_ms(end_to_end, 0.5):.1f} ms, p99 {_ms(end_to_end, 0.99):.1f} ms "
              f"(RecordEvent round trip alone: p50 {_ms(round_trip, 0.5):.1f} ms, "
              f"mean end-to-end {statistics.mean(end_to_end) * 1000:.1f} ms)")

        delivered, recorded, lag = trio.run(_fan_out, suite, key, team_id, args.clients, args.burst)
        print(f"fan-out to {args.clients} SSE clients ({args.burst} events): "
              f"{delivered:,.0f} frames/s delivered in total, {delivered / args.clients:,.0f} "
              f"per client; events recorded at {recorded:,.0f}/s, the last client done "
              f"{lag * 1000:.0f} ms after the last record (the live rate is the record rate "
              "while the clients keep up)")
        return 0
    finally:
        suite.stop()


if __name__ == "__main__":
    sys.exit(main())
