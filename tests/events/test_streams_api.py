"""``/v1/events/stream`` and ``/v1/admin/events/stream`` over real HTTP against ``dovecote up``.

Capsule events are sent to the suite's event log over its bus
(:class:`RecordEvent`, as vmmgr does), so no VM is needed.
"""

from __future__ import annotations

import secrets
import socket
from typing import Any

import httpx
import trio

from tests.accounts.helpers import Browser
from tests.events.conftest import KEEPALIVE_S, QUEUE_EVENTS, Member
from tests.events.fakes import Frame, capsule_event
from tests.events.helpers import open_sse, record, record_many
from tests.helpers.suite import Suite

ADMIN_STREAM = "/v1/admin/events/stream"


def resources(frames: list[Frame]) -> list[str]:
    return [f.data["resource"]["id"] for f in frames]


async def test_a_stream_opens_with_the_connected_sentinel(events_suite: Suite, team_a: Member) -> None:
    with trio.fail_after(30):
        async with open_sse(events_suite, key=team_a.key) as sse:
            assert sse.status == 200
            assert sse.response.headers["content-type"].startswith("text/event-stream")
            assert sse.response.headers["cache-control"] == "no-cache"
            first = await sse.frame()
            assert first.event == "connected" and first.data["event"] == "connected"
            assert isinstance(first.id, int) and first.data["timestamp"].endswith("Z")


async def test_streams_need_credentials(events_suite: Suite) -> None:
    with trio.fail_after(30):
        for path in ("/v1/events/stream", ADMIN_STREAM):
            async with open_sse(events_suite, path) as sse:
                assert sse.status == 401
                assert (await sse.error())["error"]["code"] == "unauthorized"
        async with open_sse(events_suite, key="wrn_" + "0" * 48) as sse:
            assert sse.status == 401
            assert set((await sse.error())["error"]) == {"code", "message"}


async def test_only_a_platform_admin_session_opens_the_admin_stream(
        events_suite: Suite, team_a: Member) -> None:
    with trio.fail_after(30):
        async with open_sse(events_suite, ADMIN_STREAM, cookies=team_a.browser.http.cookies) as sse:
            assert sse.status == 403
            assert (await sse.error())["error"]["code"] == "forbidden"
        async with open_sse(events_suite, ADMIN_STREAM, key=team_a.key) as sse:
            assert sse.status == 403
            assert (await sse.error())["error"]["code"] == "session_required"


async def test_a_bad_resume_position_is_400(events_suite: Suite, team_a: Member) -> None:
    with trio.fail_after(30):
        async with open_sse(events_suite, key=team_a.key, params={"after": "-3"}) as sse:
            assert sse.status == 400
            assert (await sse.error())["error"]["code"] == "invalid_request"
        async with open_sse(events_suite, key=team_a.key, headers={"Last-Event-ID": "x"}) as sse:
            assert sse.status == 400


async def test_a_team_sees_only_its_own_events_and_the_admin_stream_every_team(
        events_suite: Suite, team_a: Member, team_b: Member,
        admin: tuple[Browser, dict[str, Any]]) -> None:
    tag = secrets.token_hex(3)
    with trio.fail_after(60):
        async with open_sse(events_suite, key=team_a.key) as a, \
                open_sse(events_suite, cookies=team_b.browser.http.cookies) as b, \
                open_sse(events_suite, ADMIN_STREAM, cookies=admin[0].http.cookies) as every:
            for sse in (a, b, every):
                assert (await sse.frame()).event == "connected"
            ids = []
            for team, name in ((team_a, "a1"), (team_b, "b1"), (team_a, "a2"), (team_b, "b2")):
                ids += await record(events_suite, team.team_id, capsule_event(f"{name}-{tag}"))
            seen_a, seen_b = await a.events(2), await b.events(2)
            assert resources(seen_a) == [f"a1-{tag}", f"a2-{tag}"]
            assert [f.id for f in seen_a] == [ids[0], ids[2]]
            assert resources(seen_b) == [f"b1-{tag}", f"b2-{tag}"]
            assert [f.id for f in seen_b] == [ids[1], ids[3]]
            seen_all = [await every.until(f"{name}-{tag}") for name in ("a1", "b1", "a2", "b2")]
            assert [f.id for f in seen_all] == ids
            assert seen_all[0].event == "capsule.create" and seen_all[0].data["outcome"] == "success"


async def test_resuming_gives_no_gap_and_no_duplicate(events_suite: Suite, team_a: Member) -> None:
    tag = secrets.token_hex(3)
    with trio.fail_after(60):
        async with open_sse(events_suite, key=team_a.key) as sse:
            await sse.frame()
            ids = await record(events_suite, team_a.team_id,
                               *[capsule_event(f"r{n}-{tag}") for n in range(5)])
            read = await sse.events(2)
        assert [f.id for f in read] == ids[:2]
        missed = ids[2:]
        resume = str(read[-1].id)
        for how in ({"headers": {"Last-Event-ID": resume}}, {"params": {"after": resume}},
                    # EventSource resends its URL: the newer header wins over ?after=
                    {"headers": {"Last-Event-ID": resume}, "params": {"after": "0"}}):
            async with open_sse(events_suite, key=team_a.key, **how) as sse:  # type: ignore[arg-type]
                connected = await sse.frame()
                assert (connected.event, connected.id) == ("connected", int(resume))
                replayed = await sse.events(len(missed))
                assert [f.id for f in replayed] == missed
                live = await record(events_suite, team_a.team_id, capsule_event(f"live-{tag}"))
                assert [f.id for f in await sse.events(1)] == live
                missed += live


async def test_a_resume_position_beyond_the_log_starts_at_its_end(
        events_suite: Suite, team_a: Member) -> None:
    with trio.fail_after(30):
        async with open_sse(events_suite, key=team_a.key,
                            headers={"Last-Event-ID": str(10**15)}) as sse:
            connected = await sse.frame()
            assert connected.id is not None and connected.id < 10**15
            live = await record(events_suite, team_a.team_id, capsule_event("after-the-end"))
            assert [f.id for f in await sse.events(1)] == live


async def test_a_burst_arrives_complete_and_in_order(events_suite: Suite, team_a: Member) -> None:
    tag = secrets.token_hex(3)
    burst = [capsule_event(f"burst{n}-{tag}") for n in range(300)]
    ids: list[int] = []
    with trio.fail_after(120):
        async with open_sse(events_suite, key=team_a.key) as sse:
            await sse.frame()

            async def send() -> None:
                ids.extend(await record_many(events_suite, team_a.team_id, burst))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                got = await sse.events(len(burst))
    assert [f.id for f in got] == ids
    assert sorted(resources(got)) == sorted(e.resource.id for e in burst)


async def test_an_idle_stream_gets_keepalive_comments(events_suite: Suite, team_a: Member) -> None:
    with trio.fail_after(30):
        async with open_sse(events_suite, key=team_a.key) as sse:
            await sse.frame()
            began = trio.current_time()
            for _ in range(2):
                assert (await sse.frame(comments=True)).comment == "keepalive"
            assert trio.current_time() - began < 2 * KEEPALIVE_S + 3


async def test_a_revoked_key_ends_its_stream(events_suite: Suite, team_a: Member) -> None:
    created = team_a.browser.post("/v1/api-keys", {"name": "short-lived"})
    assert created.status_code == 201, created.text
    with trio.fail_after(30):
        async with open_sse(events_suite, key=created.json()["key"]) as sse:
            await sse.frame()
            deleted = await trio.to_thread.run_sync(
                lambda: team_a.browser.send("DELETE", f"/v1/api-keys/{created.json()['id']}"))
            assert deleted.status_code == 204, deleted.text
            while (frame := await sse.frame()).event != "error":
                pass
            assert frame.data["metadata"] == {"reason": "unauthorized"}


async def test_a_client_that_does_not_keep_up_is_cut_off_with_a_reason(
        events_suite: Suite, team_a: Member) -> None:
    """The client stops reading (tiny receive buffer); its queue overflows; it gets an error frame."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", events_suite.port))
    stream = trio.SocketStream(sock)
    seen = bytearray()
    with trio.fail_after(120):
        async with stream:
            await stream.send_all((f"GET /v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   f"X-API-Key: {team_a.key}\r\n\r\n").encode())
            while b"event: connected" not in seen:
                seen += await stream.receive_some(65536)
            assert seen.startswith(b"HTTP/1.1 200")
            pad = "x" * 32768  # far more than the socket buffers hold, in few events
            count = 10 * QUEUE_EVENTS
            await record_many(events_suite, team_a.team_id,
                              [capsule_event(f"slow{n}", metadata={"pad": pad}) for n in range(count)])
            # Now read everything: what fit in the buffers, then the reason, then the end.
            while not seen.endswith(b"\r\n0\r\n\r\n"):
                data = await stream.receive_some(1 << 20)
                if not data:
                    break
                seen += data
    assert b"event: error\ndata: " in seen and b'"reason":"slow_client"' in seen
    delivered = seen.count(b"event: capsule.create")
    assert delivered < count
    assert seen.index(b"event: error") > seen.rfind(b"event: capsule.create")


def test_the_streams_and_the_callback_are_documented(events_suite: Suite) -> None:
    doc = httpx.get(events_suite.url + "/openapi.json").json()
    assert "get" in doc["paths"]["/v1/events/stream"]
    assert "get" in doc["paths"][ADMIN_STREAM]
    assert "post" in doc["paths"]["/v1/hosts/sandbox-events"]
