"""The SSE stream's frames, order and limits, on an in-memory log and event plane.

:class:`~dovecote.gateway.routes.events.EventStream` is driven directly (its
``frames()`` generator is the response body), so dropped events, pages and
slow clients are set up exactly; the same behaviour over real HTTP is in
``test_streams_api.py``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager

import pytest
import trio
import trio.testing

from dovecote.bus.messages.events import EventAppended
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routes import events as ev
from tests.events.fakes import FakeBus, Frame, capsule_event, fake_state, parse_frames


async def allowed() -> None:
    await trio.lowlevel.checkpoint()


class Reader:
    """Pulls chunks from a stream's body and hands out its frames one by one."""

    def __init__(self, body: AsyncGenerator[bytes, None]) -> None:
        self.body = body
        self.pending: list[Frame] = []

    async def frame(self, *, comments: bool = False) -> Frame:
        while True:
            while self.pending:
                frame = self.pending.pop(0)
                if comments or frame.comment is None:
                    return frame
            self.pending.extend(parse_frames(await self.body.__anext__()))

    async def events(self, count: int) -> list[Frame]:
        return [await self.frame() for _ in range(count)]

    async def ended(self) -> bool:
        try:
            await self.body.__anext__()
        except StopAsyncIteration:
            return True
        return False


@asynccontextmanager
async def open_stream(bus: FakeBus, team_id: str, start: int, *, keepalive_s: float = 30.0,
                      queue: int = 1024,
                      check: Callable[[], Awaitable[None]] = allowed) -> AsyncIterator[Reader]:
    async with trio.open_nursery() as nursery:
        stream = ev.EventStream(state=fake_state(bus, nursery, keepalive_s=keepalive_s, queue=queue),
                                team_id=team_id, start=start, check_access=check)
        async with aclosing(stream.frames()) as body:
            yield Reader(body)


def ids(frames: list[Frame]) -> list[int | None]:
    return [f.id for f in frames]


async def test_the_sentinel_comes_first_with_the_start_position_then_the_replay() -> None:
    bus = FakeBus()
    for n in range(5):
        bus.append("t1" if n % 2 == 0 else "t2", f"c{n}")
    with trio.fail_after(5):
        async with open_stream(bus, "t1", 1) as reader:
            first = await reader.frame()
            assert (first.event, first.id, first.data["event"]) == ("connected", 1, "connected")
            assert set(first.data) == {"event", "timestamp"}
            replay = await reader.events(2)
            assert ids(replay) == [3, 5]  # team t1's events after id 1
            assert replay[0].event == "capsule.create"
            assert replay[0].data["resource"] == {"id": "c2", "type": "capsule"}


async def test_the_replay_reads_every_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev, "PAGE", 3)
    bus = FakeBus()
    for n in range(10):
        bus.append("t1", f"c{n}")
    with trio.fail_after(5):
        async with open_stream(bus, "", 0) as reader:
            await reader.frame()
            assert ids(await reader.events(10)) == list(range(1, 11))


async def test_an_event_both_replayed_and_live_is_written_once() -> None:
    bus = FakeBus()
    with trio.fail_after(5):
        async with open_stream(bus, "t1", 0) as reader:
            assert (await reader.frame()).event == "connected"
            bus.append("t1", "a")  # live; the replay already passed
            bus.append("t1", "b")
            assert ids(await reader.events(2)) == [1, 2]
            # Published again (another notifier, a re-delivery): never written twice.
            for subscriber in bus.subscribers:
                subscriber.send_nowait((ev.EVENT_TOPIC, bus.log[0]))
            bus.append("t1", "c")
            assert ids(await reader.events(1)) == [3]


async def test_ids_the_event_plane_dropped_are_read_from_the_log() -> None:
    bus = FakeBus()
    with trio.fail_after(5):
        async with open_stream(bus, "t1", 0) as reader:
            await reader.frame()
            bus.append("t1", "a")
            bus.append("t1", "lost-1", publish=False)
            bus.append("t2", "other", publish=False)
            bus.append("t1", "lost-2", publish=False)
            bus.append("t1", "b")
            frames = await reader.events(4)
            assert ids(frames) == [1, 2, 4, 5]
            assert [f.data["resource"]["id"] for f in frames] == ["a", "lost-1", "lost-2", "b"]


async def test_the_admin_stream_has_every_team_and_a_team_stream_only_its_own() -> None:
    bus = FakeBus()
    with trio.fail_after(5):
        async with open_stream(bus, "", 0) as admin, open_stream(bus, "t1", 0) as team:
            await admin.frame()
            await team.frame()
            bus.append("t1", "a")
            bus.append("t2", "b")
            bus.append("", "platform")
            bus.append("t1", "c")
            assert ids(await admin.events(4)) == [1, 2, 3, 4]
            assert ids(await team.events(2)) == [1, 4]


async def test_an_idle_stream_gets_keepalives_and_the_dropped_tail_of_a_burst(
        autojump_clock: trio.testing.MockClock) -> None:
    bus = FakeBus()
    with trio.fail_after(120):
        async with open_stream(bus, "t1", 0, keepalive_s=30) as reader:
            await reader.frame()
            bus.append("t1", "a")
            assert ids(await reader.events(1)) == [1]  # replayed or live
            bus.append("t1", "b")
            assert ids(await reader.events(1)) == [2]  # live: the replay is over
            began = trio.current_time()
            bus.append("t1", "dropped-tail", publish=False)
            keepalive = await reader.frame(comments=True)
            assert keepalive.comment == "keepalive"
            assert trio.current_time() - began == pytest.approx(30, abs=0.1)
            tail = await reader.frame(comments=True)  # read from the log at the keepalive
            assert (tail.id, tail.data["resource"]["id"]) == (3, "dropped-tail")


async def test_a_client_that_falls_behind_is_cut_off_with_a_reason() -> None:
    bus = FakeBus()
    with trio.fail_after(5):
        async with open_stream(bus, "t1", 0, queue=4) as reader:
            await reader.frame()
            bus.append("t1", "a")
            await reader.events(1)
            bus.append("t1", "b")
            await reader.events(1)  # live: the replay is over
            for n in range(20):  # nobody reads meanwhile
                bus.append("t1", f"c{n}")
            await trio.testing.wait_all_tasks_blocked()
            assert bus.subscribers == []  # the follower stopped and let go of its subscription
            frames = []
            while (frame := await reader.frame()).event != "error":
                frames.append(frame)
            assert frame.id is None and frame.data["metadata"] == {"reason": "slow_client"}
            assert "Last-Event-ID" in frame.data["error"]
            assert frames == []  # cut off at once, the queued events dropped
            assert await reader.ended()


async def test_a_stream_whose_credential_stopped_working_ends(
        autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def revoked_later() -> None:
        nonlocal calls
        calls += 1
        await trio.lowlevel.checkpoint()
        if calls > 1:
            raise ApiError(401, "unauthorized", "the API key was revoked")

    bus = FakeBus()
    with trio.fail_after(300):
        async with open_stream(bus, "t1", 0, keepalive_s=10, check=revoked_later) as reader:
            await reader.frame()
            frame = await reader.frame()
            assert frame.event == "error" and frame.data["metadata"] == {"reason": "unauthorized"}
            assert frame.data["error"] == "the API key was revoked"
            assert await reader.ended()
            assert trio.current_time() == pytest.approx(20, abs=0.1)


async def test_closing_the_body_stops_the_follower() -> None:
    bus = FakeBus()
    with trio.fail_after(5):
        async with open_stream(bus, "t1", 0) as reader:
            await reader.frame()
            assert len(bus.subscribers) == 1
            await reader.body.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert bus.subscribers == []


async def test_a_notifier_that_stops_answering_ends_the_stream_with_a_reason() -> None:
    bus = FakeBus()
    bus.append("t1", "a")
    with trio.fail_after(5):
        async with open_stream(bus, "t1", 0) as reader:
            await reader.frame()
            assert ids(await reader.events(1)) == [1]
            bus.fail_lists = True
            bus.append("t1", "lost", publish=False)
            bus.append("t1", "b")  # a gap: the log must be read, and cannot be
            frame = await reader.frame()
            assert frame.event == "error" and frame.data["metadata"] == {"reason": "unavailable"}
            assert await reader.ended()


async def test_a_stream_that_cannot_subscribe_says_so_and_ends() -> None:
    bus = FakeBus()
    bus.fail_subscribe = True
    with trio.fail_after(5):
        async with open_stream(bus, "t1", 0) as reader:
            frame = await reader.frame()
            assert frame.event == "error" and frame.data["metadata"] == {"reason": "unavailable"}
            assert await reader.ended()


def test_the_follower_filter_flags_jumps_and_hides_other_teams() -> None:
    def appended(n: int, team: str) -> EventAppended:
        return EventAppended(id=n, team_id=team, event=capsule_event("c"))

    item = ev.follow("t1")
    assert item(None, appended(7, "t2")) == ev.Live(7, True, None)  # the first id is a jump
    assert item(7, appended(8, "t2")) is None
    mine = appended(9, "t1")
    assert item(8, mine) == ev.Live(9, False, mine)
    assert item(9, appended(12, "t2")) == ev.Live(12, True, None)
    assert item(12, appended(11, "t1")) is None  # late: covered by the gap read
    every = ev.follow("")
    other = appended(13, "t2")
    assert every(12, other) == ev.Live(13, False, other)


def test_the_resume_position_prefers_last_event_id_and_refuses_garbage() -> None:
    assert ev.parse_position(None, None) is None
    assert ev.parse_position("42", "7") == 42
    assert ev.parse_position("", "7") == 7  # EventSource's empty header before any id
    assert ev.parse_position(None, " 0 ") == 0
    for bad in ("-1", "abc", "1e3", "9" * 19, "٣"):
        with pytest.raises(ApiError) as info:
            ev.parse_position(bad, None)
        assert info.value.status == 400
        with pytest.raises(ApiError):
            ev.parse_position(None, bad)


def test_frames_follow_the_reference_format() -> None:
    appended = EventAppended(id=5, team_id="t", event=capsule_event("sb-1"))
    frame = ev.event_frame(appended)
    assert frame.startswith(b"id: 5\nevent: capsule.create\ndata: {")
    assert frame.endswith(b"}\n\n") and frame.count(b"\n") == 4
    assert ev.error_frame("slow_client", "too slow").startswith(b"event: error\ndata: ")
