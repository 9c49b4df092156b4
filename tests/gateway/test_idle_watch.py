"""The gateway's idle timeout: one watcher per connection, with hypercorn's meaning.

:class:`IdleWatch` is driven here the way hypercorn's connection server drives
its idle "single task" (``restart`` when the connection turns idle, ``stop``
when a request begins), on Trio's mock clock, against a stand-in server that
records when it is asked to close.
"""

from __future__ import annotations

from types import SimpleNamespace

import trio
import trio.testing

from dovecote.gateway.idle_watch import IdleWatch

KEEP_ALIVE = 5.0


class _Server:
    def __init__(self) -> None:
        self.config = SimpleNamespace(keep_alive_timeout=KEEP_ALIVE)
        self.terminated = trio.Event()
        self.context = SimpleNamespace(terminated=self.terminated)
        self.closed_at: float | None = None

    async def _initiate_server_close(self) -> None:
        self.closed_at = trio.current_time()


class _Group:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery


async def _never() -> None:
    raise AssertionError("hypercorn's own idle action is not used")


async def test_an_idle_connection_closes_after_the_keep_alive_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    server = _Server()
    watch = IdleWatch(server)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await watch.restart(_Group(nursery), _never)
    assert server.closed_at is not None
    assert server.closed_at - start == KEEP_ALIVE


async def test_a_request_holds_the_timeout_off_until_the_connection_is_idle_again(
        autojump_clock: trio.testing.MockClock) -> None:
    server = _Server()
    watch = IdleWatch(server)
    async with trio.open_nursery() as nursery:
        group = _Group(nursery)
        await watch.restart(group, _never)
        await trio.sleep(KEEP_ALIVE - 1)
        await watch.stop()  # a request: however long it takes, the connection stays
        await trio.sleep(KEEP_ALIVE * 10)
        assert server.closed_at is None
        idle_again = trio.current_time()
        await watch.restart(group, _never)  # answered: the timeout starts over
    assert server.closed_at == idle_again + KEEP_ALIVE


async def test_a_stopping_server_closes_an_idle_connection_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    server = _Server()
    watch = IdleWatch(server)
    async with trio.open_nursery() as nursery:
        await watch.restart(_Group(nursery), _never)
        await trio.sleep(1)
        stopped = trio.current_time()
        server.terminated.set()
    assert server.closed_at == stopped


async def test_a_stopping_server_lets_a_busy_connection_finish_its_answer(
        autojump_clock: trio.testing.MockClock) -> None:
    server = _Server()
    watch = IdleWatch(server)
    async with trio.open_nursery() as nursery:
        group = _Group(nursery)
        await watch.restart(group, _never)
        await watch.stop()
        server.terminated.set()
        await trio.sleep(30)
        assert server.closed_at is None  # the request is still being answered
        answered = trio.current_time()
        await watch.restart(group, _never)
    assert server.closed_at == answered


async def test_the_watcher_ends_with_the_connection_without_closing_it_again(
        autojump_clock: trio.testing.MockClock) -> None:
    server = _Server()
    watch = IdleWatch(server)
    with trio.fail_after(1):  # the nursery must not wait out the keep-alive timeout
        async with trio.open_nursery() as nursery:
            await watch.restart(_Group(nursery), _never)
            await trio.sleep(0.5)
            watch.end()  # the client hung up: the reader is done
    assert server.closed_at is None


async def test_one_watcher_task_serves_every_keep_alive_period() -> None:
    server = _Server()
    watch = IdleWatch(server)
    async with trio.open_nursery() as nursery:
        group = _Group(nursery)
        for _ in range(100):
            await watch.restart(group, _never)
            await watch.stop()
        await trio.testing.wait_all_tasks_blocked()
        assert len(nursery.child_tasks) == 1
        watch.end()
