"""Requests through a real broker: routing, balancing, errors, deaths and restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio

from dovecote.bus import (
    Bus,
    BusEndpoints,
    BusError,
    BusTimeout,
    Ping,
    Pong,
    RemoteError,
    open_broker,
    open_bus,
)
from dovecote.libs.context import bind_request_id, request_id

from .conftest import HEARTBEAT
from .messages_for_tests import Echo, EchoReply, IdempotentEcho


class Teapot(BusError):
    code = "teapot"


def make_handler(name: str):
    async def handler(msg):
        if isinstance(msg, Ping):
            return Pong(service=name, version="test", uptime_s=0.0)
        await trio.sleep(msg.delay)
        if msg.fail == "bus":
            raise Teapot("short and stout")
        if msg.fail == "boom":
            raise ValueError("kaboom")
        return EchoReply(text=msg.text, worker=name, request_id=request_id.get())

    return handler


async def test_request_returns_reply_and_request_id_crosses_the_bus(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(bus.serve, "echo", make_handler("w1"))
            with bind_request_id("rid-1234"):
                reply = await bus.request("echo", Echo(text="hi"), timeout=2)
            pong = await bus.request("echo", Ping(), timeout=2)
        nursery.cancel_scope.cancel()
    assert reply == EchoReply(text="hi", worker="w1", request_id="rid-1234")
    assert isinstance(pong, Pong) and pong.service == "w1" and pong.details == {}


async def test_many_tasks_share_one_client_socket(bus: Bus):
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        reply = await bus.request("echo", Echo(text=str(i), delay=0.01 * (i % 3)), timeout=5)
        results[i] = reply.text

    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(bus.serve, "echo", make_handler("w1"))
            async with trio.open_nursery() as clients:
                for i in range(300):
                    clients.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert results == {i: str(i) for i in range(300)}


async def test_requests_are_load_balanced_across_workers(endpoints, broker):
    async with open_bus(endpoints, "w", heartbeat=HEARTBEAT) as wbus, \
            open_bus(endpoints, "c", heartbeat=HEARTBEAT) as cbus, trio.open_nursery() as nursery:
        with trio.fail_after(10):
            for name in ("w1", "w2", "w3"):
                await nursery.start(wbus.serve, "echo", make_handler(name))
            seen = Counter()
            for _ in range(30):
                seen[(await cbus.request("echo", Echo(), timeout=2)).worker] += 1
            assert seen == {"w1": 10, "w2": 10, "w3": 10}
            # concurrent load spreads too
            busy = Counter()

            async def one() -> None:
                busy[(await cbus.request("echo", Echo(delay=0.05), timeout=5)).worker] += 1

            async with trio.open_nursery() as clients:
                for _ in range(30):
                    clients.start_soon(one)
            assert set(busy) == {"w1", "w2", "w3"}
        nursery.cancel_scope.cancel()


async def test_handler_errors_reach_the_caller_with_their_code(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(bus.serve, "echo", make_handler("w1"))
            with pytest.raises(RemoteError) as bus_err:
                await bus.request("echo", Echo(fail="bus"), timeout=2)
            with pytest.raises(RemoteError) as other:
                await bus.request("echo", Echo(fail="boom"), timeout=2)
        nursery.cancel_scope.cancel()
    assert bus_err.value.code == "teapot" and "stout" in bus_err.value.message
    assert other.value.code == "internal" and "kaboom" in other.value.message


async def test_slow_handler_makes_request_time_out(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(bus.serve, "echo", make_handler("w1"))
            start = trio.current_time()
            with pytest.raises(BusTimeout):
                await bus.request("echo", Echo(delay=2), timeout=0.3)
            assert trio.current_time() - start < 0.6
        nursery.cancel_scope.cancel()


async def test_request_to_name_without_worker_fails_with_no_worker_at_deadline(bus: Bus):
    with trio.fail_after(5):
        start = trio.current_time()
        with pytest.raises(RemoteError) as err:
            await bus.request("nobody", Echo(), timeout=0.3)
        elapsed = trio.current_time() - start
    assert err.value.code == "no_worker"
    assert 0.2 < elapsed < 0.5


async def test_request_waits_for_a_worker_that_registers_within_the_deadline(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):

            async def late_worker() -> None:
                await trio.sleep(0.2)
                await nursery.start(bus.serve, "late", make_handler("late"))

            nursery.start_soon(late_worker)
            reply = await bus.request("late", Echo(text="x"), timeout=3)
        nursery.cancel_scope.cancel()
    assert reply.worker == "late"


async def test_stopped_worker_fails_inflight_request_with_worker_lost(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            worker_scope = trio.CancelScope()

            async def worker(task_status=trio.TASK_STATUS_IGNORED):
                with worker_scope:
                    await bus.serve("echo", make_handler("w1"), task_status=task_status)

            await nursery.start(worker)

            async def stop_soon() -> None:
                await trio.sleep(0.1)
                worker_scope.cancel()  # serve sends DISCONNECT on the way out

            nursery.start_soon(stop_soon)
            start = trio.current_time()
            with pytest.raises(RemoteError) as err:
                await bus.request("echo", Echo(delay=10), timeout=4)
            assert trio.current_time() - start < 1.0
    assert err.value.code == "worker_lost"


async def test_an_idempotent_request_whose_worker_is_lost_is_answered_by_another(bus: Bus):
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            lost_scope = trio.CancelScope()
            handled = []

            async def slow(msg):
                handled.append("lost")
                await trio.sleep(10)

            async def lost_worker(task_status=trio.TASK_STATUS_IGNORED):
                with lost_scope:
                    await bus.serve("twice", slow, task_status=task_status)

            await nursery.start(lost_worker)

            async def stop_then_replace() -> None:
                await trio.sleep(0.1)
                await nursery.start(bus.serve, "twice", make_handler("w2"))
                lost_scope.cancel()  # DISCONNECT with the request in flight

            nursery.start_soon(stop_then_replace)
            reply = await bus.request("twice", IdempotentEcho(text="hi"), timeout=4)
            assert reply.worker == "w2" and reply.text == "hi"
            assert handled == ["lost"]  # the first worker had it, then was lost
            nursery.cancel_scope.cancel()


async def _start_worker_process(endpoints: BusEndpoints, service: str) -> trio.Process:
    env = {**os.environ, **endpoints.to_env()}
    script = Path(__file__).with_name("worker_proc.py")
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), service], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    buf = b""
    while b"ready" not in buf:
        chunk = await proc.stdout.receive_some()
        assert chunk, "worker process exited before it was ready"
        buf += chunk
    return proc


async def test_killed_worker_process_fails_inflight_request_fast_with_worker_lost(
        endpoints, bus: Bus):
    with trio.fail_after(15):
        proc = await _start_worker_process(endpoints, "killme")
        try:
            async with trio.open_nursery() as nursery:

                async def kill_soon() -> None:
                    await trio.sleep(0.2)
                    proc.send_signal(signal.SIGKILL)  # no DISCONNECT: heartbeats expire

                nursery.start_soon(kill_soon)
                start = trio.current_time()
                with pytest.raises(RemoteError) as err:
                    await bus.request("killme", Echo(delay=30), timeout=8)
                elapsed = trio.current_time() - start
        finally:
            proc.kill()
            await proc.wait()
    assert err.value.code == "worker_lost"
    assert elapsed < 1.5  # heartbeat 0.1 s x 3, far below the 8 s timeout


async def test_broker_restart_fails_inflight_at_once_with_worker_lost_and_workers_reregister(endpoints):
    with trio.fail_after(20):
        async with open_bus(endpoints, "w", heartbeat=HEARTBEAT) as wbus, \
                open_bus(endpoints, "c", heartbeat=HEARTBEAT) as cbus, \
                trio.open_nursery() as nursery:
            async with open_broker(endpoints):
                await nursery.start(wbus.serve, "echo", make_handler("w1"))
                assert (await cbus.request("echo", Echo(text="a"), timeout=2)).text == "a"
                inflight_error: list[BaseException] = []
                inflight_took: list[float] = []

                async def inflight() -> None:
                    began = trio.current_time()
                    try:
                        await cbus.request("echo", Echo(delay=0.5), timeout=5.0)
                    except BusError as exc:
                        inflight_error.append(exc)
                        inflight_took.append(trio.current_time() - began)

                nursery.start_soon(inflight)
                await trio.sleep(0.1)
            # broker is gone
            with pytest.raises(BusTimeout):
                await cbus.request("echo", Echo(), timeout=0.3)
            async with open_broker(endpoints):
                reply = await cbus.request("echo", Echo(text="again"), timeout=5)
                assert reply.text == "again"
            # The broker that had it forgot it: it failed when the connection dropped,
            # not at its deadline.
            assert len(inflight_error) == 1 and isinstance(inflight_error[0], RemoteError)
            assert inflight_error[0].code == "worker_lost" and inflight_took[0] < 1.0
            nursery.cancel_scope.cancel()


async def test_request_on_closed_bus_raises_bus_closed(endpoints, broker):
    from dovecote.bus import BusClosed

    async with open_bus(endpoints, "c") as b:
        pass
    with pytest.raises(BusClosed):
        await b.request("echo", Echo(), timeout=1)


def test_endpoints_round_trip_through_env(tmp_path):
    ep = BusEndpoints.local(tmp_path).with_server_key("k" * 40)
    assert BusEndpoints.from_env(ep.to_env()) == ep
    assert ep.rpc == f"ipc://{tmp_path}/bus/rpc.sock"
    tcp = BusEndpoints.local("127.0.0.1", base_port=5550)
    assert (tcp.rpc, tcp.pub, tcp.sub) == ("tcp://127.0.0.1:5550", "tcp://127.0.0.1:5551",
                                           "tcp://127.0.0.1:5552")
