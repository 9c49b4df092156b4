"""Bus benchmark: request round trip through the broker vs raw pyzmq, and event fan-out.

Run with ``.venv/bin/python benchmarks/bus.py`` (about 20-30 s).  Every party is its
own process: the broker, the worker, the subscribers; the client/publisher is this
process.  Transport is ipc in a temporary directory.  The three round trips are
measured in interleaved rounds (bus, direct, proxy, bus, ...) so that a machine
busy with other work slows all three alike and the ratios stay meaningful;
``--rounds`` sets how many (each round's proxy ratio is printed; many short
rounds follow the load more closely than a few long ones).  Because wall-clock
latency on a shared machine swings with the load, the CPU time each path
costs per round trip (every thread of every process on it, from /proc) is
printed too: it moves much less with the load.

Printed:
- p50/p99 round trip of a small msgspec request via ``Bus.request`` -> broker -> worker;
- raw pyzmq DEALER -> ROUTER echo (no broker hop: the floor);
- raw pyzmq DEALER -> ROUTER/DEALER ``zmq.proxy`` -> DEALER echo (same hop count as
  the bus: the fair baseline) and the ratios;
- event fan-out to 4 subscribers (deliveries per second, and losses if any).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import zmq

from dovecote.bus import Bus, BusEndpoints, Message, open_bus, run_broker
from dovecote.bus.messages.base import Family, Request

N_RPC = 5000
N_RAW = 5000
N_EVENTS = 50_000
SUBSCRIBERS = 4


class Sum(Message, tag="bench.sum"):
    total: int


class Add(Request[Sum], tag="bench.add"):
    a: int
    b: int


class Tick(Message, tag="bench.tick"):
    n: int
    capsule: str = "c-0123456789"


FAMILY = Family("bench", __name__)


# -- child processes -----------------------------------------------------------------


def broker_proc(ep: BusEndpoints) -> None:
    run_broker(ep)


def worker_proc(ep: BusEndpoints) -> None:
    async def handler(msg: Add) -> Sum:
        return Sum(total=msg.a + msg.b)

    async def main() -> None:
        async with open_bus(ep, "bench-worker") as bus:
            await bus.serve("adder", handler)

    trio.run(main)


def subscribers_proc(ep: BusEndpoints, ready: mp.Event, results: mp.Queue) -> None:
    async def one(bus, counts, i, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with bus.subscribe("capsule.") as events:
            task_status.started()
            first = None
            while True:
                with trio.move_on_after(2.0) as cs:
                    _topic, ev = await events.receive()
                if cs.cancelled_caught:
                    break
                first = first or time.perf_counter()
                counts[i] += 1
                counts[f"last{i}"] = time.perf_counter()
                if ev.n == N_EVENTS - 1:
                    break

    async def main() -> None:
        counts: dict = dict.fromkeys(range(SUBSCRIBERS), 0)
        async with open_bus(ep, "bench-subs") as bus, trio.open_nursery() as nursery:
            for i in range(SUBSCRIBERS):
                await nursery.start(one, bus, counts, i)
            ready.set()
        results.put(counts)

    trio.run(main)


def raw_echo_router(addr: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(addr)
    while True:
        s.send_multipart(s.recv_multipart())


def raw_proxy(front: str, back: str) -> None:
    ctx = zmq.Context()
    f = ctx.socket(zmq.ROUTER)
    f.bind(front)
    b = ctx.socket(zmq.DEALER)
    b.bind(back)
    zmq.proxy(f, b)


def raw_echo_dealer(addr: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(addr)
    while True:
        s.send_multipart(s.recv_multipart())


# -- measurements ----------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p / 100))] * 1e6


def raw_roundtrips(addr: str, n: int) -> list[float]:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.connect(addr)
    s.send_multipart([b"warm"])
    s.recv_multipart()
    out = []
    body = msgspec_body()
    for _ in range(n):
        t = time.perf_counter()
        s.send_multipart([body])
        s.recv_multipart()
        out.append(time.perf_counter() - t)
    s.close(linger=0)
    return out


def timed_raw_roundtrips(addr: str, n: int) -> tuple[list[float], float]:
    """:func:`raw_roundtrips` and the CPU time of the calling thread spent in them."""
    t = time.thread_time()
    samples = raw_roundtrips(addr, n)
    return samples, time.thread_time() - t


def msgspec_body() -> bytes:
    from dovecote.bus.messages import encode

    return encode(Add(a=1, b=2))


async def bus_roundtrips(bus: Bus, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        reply = await bus.request("adder", Add(a=i, b=1), timeout=5)
        out.append(time.perf_counter() - t)
        assert reply.total == i + 1
    return out


async def interleaved(ep: BusEndpoints, raw_addr: str, proxy_addr: str, rounds: int,
                      pids: dict[str, int], cpu: dict[str, float]
                      ) -> tuple[list[float], list[float], list[float], list[float]]:
    """``rounds`` x (bus, raw direct, raw proxy); returns the samples and each round's p50 ratio.

    ``cpu`` receives the CPU seconds each party spent in the bus and proxy rounds.
    """
    bus_rtt: list[float] = []
    raw_rtt: list[float] = []
    proxy_rtt: list[float] = []
    ratios: list[float] = []

    def snapshot(*names: str) -> dict[str, float]:
        return {name: proc_cpu(pids[name]) for name in names}
    async with open_bus(ep, "bench-client") as bus:
        with trio.fail_after(10):
            while True:  # wait for the worker to register
                try:
                    await bus.request("adder", Add(a=1, b=2), timeout=1)
                    break
                except Exception:
                    await trio.sleep(0.05)
        await bus_roundtrips(bus, 200)  # warm up
        for _ in range(rounds):
            before, t = snapshot("broker", "worker"), time.thread_time()
            b = await bus_roundtrips(bus, N_RPC // rounds)
            cpu["bus client"] = cpu.get("bus client", 0.0) + time.thread_time() - t
            for name, v in snapshot("broker", "worker").items():
                cpu[name] = cpu.get(name, 0.0) + v - before[name]
            r = await trio.to_thread.run_sync(raw_roundtrips, raw_addr, N_RAW // rounds)
            before = snapshot("proxy", "echo")
            p, client_cpu = await trio.to_thread.run_sync(timed_raw_roundtrips, proxy_addr,
                                                          N_RAW // rounds)
            cpu["proxy client"] = cpu.get("proxy client", 0.0) + client_cpu
            for name, v in snapshot("proxy", "echo").items():
                cpu[name] = cpu.get(name, 0.0) + v - before[name]
            bus_rtt += b
            raw_rtt += r
            proxy_rtt += p
            ratios.append(pct(b, 50) / pct(p, 50))
    return bus_rtt, raw_rtt, proxy_rtt, ratios


async def publish_events(ep: BusEndpoints) -> float:
    async with open_bus(ep, "bench-pub") as bus:
        await trio.sleep(0.3)
        t = time.perf_counter()
        for i in range(N_EVENTS):
            await bus.publish("capsule.state.changed", Tick(n=i))
        return t


def fan_out(ep: BusEndpoints, start: Any) -> None:
    ready = mp.Event()
    results: mp.Queue = mp.Queue()
    start(subscribers_proc, ep, ready, results)
    if not ready.wait(15):
        raise SystemExit("subscribers did not start")
    t0 = trio.run(publish_events, ep)
    counts = results.get(timeout=30)
    last = max(counts[f"last{i}"] for i in range(SUBSCRIBERS) if f"last{i}" in counts)
    delivered = sum(counts[i] for i in range(SUBSCRIBERS))
    elapsed = last - t0
    print(f"event fan-out: {N_EVENTS} events x {SUBSCRIBERS} subscribers "
          f"(publisher and the 4 subscribers in separate processes)")
    print(f"  delivered {delivered}/{N_EVENTS * SUBSCRIBERS} in {elapsed:.2f} s = "
          f"{delivered / elapsed:,.0f} deliveries/s ({N_EVENTS / elapsed:,.0f} events/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50, help="interleaved measurement rounds")
    parser.add_argument("--no-events", dest="events", action="store_false",
                        help="skip the event fan-out")
    args = parser.parse_args()
    rounds, events = max(1, args.rounds), args.events
    mp.set_start_method("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="dcbench-", dir="/tmp"))
    procs: list[mp.Process] = []

    def start(target, *args) -> int:
        p = mp.Process(target=target, args=args, daemon=True)
        p.start()
        procs.append(p)
        return p.pid

    try:
        ep = BusEndpoints.local(tmp)
        pids = {"broker": start(broker_proc, ep), "worker": start(worker_proc, ep)}
        raw_addr = f"ipc://{tmp}/raw.sock"
        start(raw_echo_router, raw_addr)
        front, back = f"ipc://{tmp}/pf.sock", f"ipc://{tmp}/pb.sock"
        pids["proxy"] = start(raw_proxy, front, back)
        pids["echo"] = start(raw_echo_dealer, back)
        cpu: dict[str, float] = {}
        bus_rtt, raw_rtt, proxy_rtt, ratios = trio.run(interleaved, ep, raw_addr, front, rounds,
                                                        pids, cpu)

        print(f"round trip, {N_RPC} sequential small requests in {rounds} interleaved rounds "
              "(microseconds):")
        rows = [("bus: client -> broker -> worker", bus_rtt),
                ("raw pyzmq DEALER -> ROUTER echo", raw_rtt),
                ("raw pyzmq via ROUTER/DEALER proxy", proxy_rtt)]
        for name, s in rows:
            print(f"  {name:36s} p50 {pct(s, 50):8.1f}   p99 {pct(s, 99):8.1f}   "
                  f"mean {statistics.fmean(s) * 1e6:8.1f}")
        for base_name, base in (("raw direct", raw_rtt), ("raw proxy", proxy_rtt)):
            print(f"  ratio bus / {base_name:10s}: p50 {pct(bus_rtt, 50) / pct(base, 50):.2f}x"
                  f"   p99 {pct(bus_rtt, 99) / pct(base, 99):.2f}x")
        print("  p50 ratio bus / raw proxy per round: "
              + " ".join(f"{r:.2f}" for r in ratios)
              + f"   (median {statistics.median(ratios):.2f}x)")
        n_bus, n_proxy = len(bus_rtt), len(proxy_rtt)
        bus_cpu = [cpu[k] / n_bus * 1e6 for k in ("bus client", "broker", "worker")]
        proxy_cpu = [cpu[k] / n_proxy * 1e6 for k in ("proxy client", "proxy", "echo")]
        print("  CPU per round trip (microseconds, all threads of each process):")
        print(f"    bus:       client {bus_cpu[0]:6.1f} + broker {bus_cpu[1]:6.1f} + worker "
              f"{bus_cpu[2]:6.1f} = {sum(bus_cpu):6.1f}")
        print(f"    raw proxy: client {proxy_cpu[0]:6.1f} + proxy  {proxy_cpu[1]:6.1f} + echo   "
              f"{proxy_cpu[2]:6.1f} = {sum(proxy_cpu):6.1f}   (ratio {sum(bus_cpu) / sum(proxy_cpu):.2f}x)")
        if events:

            fan_out(ep, start)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
