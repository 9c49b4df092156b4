"""The CDP relay core without I/O: sessions per client, routing, isolation, observations, memory."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dovecote.services.browsers.relay import (
    BROWSER,
    MAX_PENDING,
    Observation,
    Out,
    RelayCore,
    RelayError,
    action_of,
)
from dovecote.services.browsers.status import TRANSITIONS, allowed, end_status_of


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def parse(outs: list[Out]) -> list[tuple[int, dict[str, Any]]]:
    return [(o.dest, json.loads(o.data)) for o in outs]


def attach(core: RelayCore, session: str, target: str | None = None) -> int:
    client, outs = core.add_client(target)
    [(dest, msg)] = parse(outs)
    assert dest == BROWSER
    assert msg["method"] == ("Target.attachToBrowserTarget" if target is None else "Target.attachToTarget")
    assert "sessionId" not in msg
    assert core.from_browser(json.dumps({"id": msg["id"], "result": {"sessionId": session}})) == []
    assert core.is_ready(client)
    return client


def test_commands_get_the_clients_root_session_and_replies_lose_it() -> None:
    core = RelayCore(Clock())
    a = attach(core, "SA")
    b = attach(core, "SB")
    [(dest, sent)] = parse(core.from_client(a, b'{"id": 1, "method": "Browser.getVersion"}'))
    assert dest == BROWSER and sent == {"id": 1, "method": "Browser.getVersion", "sessionId": "SA"}
    [(dest, sent)] = parse(core.from_client(b, b'{"id": 1, "method": "Browser.getVersion"}'))
    assert sent["sessionId"] == "SB"
    # Same id from both clients: each reply goes to its own client, without the session.
    assert parse(core.from_browser(b'{"id": 1, "sessionId": "SB", "result": {"v": "b"}}')) == [
        (b, {"id": 1, "result": {"v": "b"}})]
    assert parse(core.from_browser(b'{"id": 1, "sessionId": "SA", "result": {"v": "a"}}')) == [
        (a, {"id": 1, "result": {"v": "a"}})]


def test_child_sessions_belong_to_the_client_that_attached_them() -> None:
    core = RelayCore(Clock())
    a = attach(core, "SA")
    b = attach(core, "SB")
    event = {"method": "Target.attachedToTarget", "sessionId": "SA",
             "params": {"sessionId": "PAGE1", "targetInfo": {"type": "page", "targetId": "T1"}}}
    [(dest, msg)] = parse(core.from_browser(json.dumps(event)))
    assert dest == a and "sessionId" not in msg and msg["params"]["sessionId"] == "PAGE1"
    # a's page events go to a with their sessionId; b may not use a's page.
    [(dest, msg)] = parse(core.from_browser(b'{"method": "Page.loadEventFired", "sessionId": "PAGE1"}'))
    assert dest == a and msg["sessionId"] == "PAGE1"
    [(dest, msg)] = parse(core.from_client(b, b'{"id": 5, "method": "Page.reload", "sessionId": "PAGE1"}'))
    assert dest == b and msg["error"]["code"] == -32001
    [(dest, msg)] = parse(core.from_client(a, b'{"id": 5, "method": "Page.reload", "sessionId": "PAGE1"}'))
    assert dest == BROWSER and msg["sessionId"] == "PAGE1"
    core.from_browser(b'{"method": "Target.detachedFromTarget", "sessionId": "SA", '
                      b'"params": {"sessionId": "PAGE1"}}')
    assert core.from_browser(b'{"method": "Page.loadEventFired", "sessionId": "PAGE1"}') == []


def test_messages_before_attach_are_held_in_order_and_bounded() -> None:
    core = RelayCore(Clock())
    client, outs = core.add_client()
    attach_id = json.loads(outs[0].data)["id"]
    for i in range(3):
        assert core.from_client(client, json.dumps({"id": i, "method": "M"}).encode()) == []
    released = parse(core.from_browser(json.dumps({"id": attach_id, "result": {"sessionId": "S"}})))
    assert [m["id"] for _, m in released] == [0, 1, 2] and all(m["sessionId"] == "S" for _, m in released)
    other, _ = core.add_client()
    for i in range(MAX_PENDING):
        core.from_client(other, json.dumps({"id": i, "method": "M"}).encode())
    with pytest.raises(RelayError):
        core.from_client(other, b'{"id": 9999, "method": "M"}')


def test_a_page_that_cannot_be_attached_answers_errors() -> None:
    core = RelayCore(Clock())
    client, outs = core.add_client("GONE")
    attach_id = json.loads(outs[0].data)["id"]
    core.from_client(client, b'{"id": 1, "method": "Runtime.evaluate"}')
    [(dest, msg)] = parse(core.from_browser(json.dumps(
        {"id": attach_id, "error": {"code": -32602, "message": "No target with given id found"}})))
    assert dest == client
    assert msg == {"id": 1, "error": {"code": -32001, "message": "No target with given id found"}}
    assert core.failure(client) == "No target with given id found"


@pytest.mark.parametrize("raw", [b"nope", b"[]", b'{"id": "1", "method": "X"}', b'{"id": 1}',
                                 b'{"id": true, "method": "X"}'])
def test_bad_client_messages_are_refused(raw: bytes) -> None:
    core = RelayCore(Clock())
    client = attach(core, "S")
    with pytest.raises(RelayError):
        core.from_client(client, raw)


def test_removing_a_client_detaches_its_session_and_drops_its_traffic() -> None:
    core = RelayCore(Clock())
    a = attach(core, "SA")
    [(dest, msg)] = parse(core.remove_client(a))
    assert dest == BROWSER and msg["method"] == "Target.detachFromTarget"
    assert msg["params"] == {"sessionId": "SA"}
    assert core.from_browser(b'{"id": 1, "sessionId": "SA", "result": {}}') == []
    # A client gone before its attach reply: the late session is detached at once.
    b, outs = core.add_client()
    attach_id = json.loads(outs[0].data)["id"]
    assert core.remove_client(b) == []
    [(dest, msg)] = parse(core.from_browser(json.dumps({"id": attach_id, "result": {"sessionId": "LATE"}})))
    assert msg["method"] == "Target.detachFromTarget" and msg["params"] == {"sessionId": "LATE"}


def test_observed_commands_become_actions_with_durations() -> None:
    clock = Clock()
    core = RelayCore(clock)
    a = attach(core, "SA")
    core.from_browser(json.dumps({"method": "Target.attachedToTarget", "sessionId": "SA",
                                  "params": {"sessionId": "P", "targetInfo": {"type": "page"}}}))
    core.from_client(a, b'{"id": 7, "method": "Page.navigate", "sessionId": "P", '
                        b'"params": {"url": "data:text/html,hi"}}')
    core.from_client(a, b'{"id": 8, "method": "Input.dispatchMouseEvent", "sessionId": "P", '
                        b'"params": {"type": "mousePressed", "x": 3, "y": 4}}')
    core.from_client(a, b'{"id": 9, "method": "Runtime.callFunctionOn", "sessionId": "P"}')
    clock.now = 100.25
    core.from_browser(b'{"id": 7, "sessionId": "P", "result": {"frameId": "F"}}')
    clock.now = 100.5
    core.from_browser(b'{"id": 8, "sessionId": "P", "error": {"code": -1, "message": "x"}}')
    core.from_browser(b'{"id": 9, "sessionId": "P", "result": {}}')
    observed = core.take_observations()
    assert [(o.method, o.finished - o.started) for o in observed] == [
        ("Page.navigate", 0.25), ("Input.dispatchMouseEvent", 0.5)]
    assert action_of(observed[0]) == ("navigate", {"url": "data:text/html,hi"})
    assert action_of(observed[1]) == ("click", {"x": 3, "y": 4, "button": "left", "clickCount": 1})
    assert observed[1].error is not None and core.take_observations() == []


def obs(method: str, params: dict[str, Any]) -> Observation:
    return Observation(client_id=1, method=method, params=params, result={}, error=None, started=0,
                       finished=0)


def test_action_table() -> None:
    assert action_of(obs("Input.dispatchMouseEvent", {"type": "mouseMoved"})) is None
    assert action_of(obs("Input.dispatchMouseEvent", {"type": "mouseReleased"})) is None
    assert action_of(obs("Input.dispatchMouseEvent", {"type": "mouseWheel", "deltaY": 40})) == (
        "scroll", {"deltaX": 0, "deltaY": 40})
    assert action_of(obs("Input.insertText", {"text": "hello"})) == ("type", {"text": "hello"})
    assert action_of(obs("Input.dispatchKeyEvent", {"type": "keyUp", "key": "a"})) is None
    assert action_of(obs("Input.dispatchKeyEvent", {"type": "keyDown", "key": "a", "text": "a"})) == (
        "type", {"text": "a", "key": "a"})
    assert action_of(obs("Runtime.evaluate", {"expression": "1+1"})) == ("evaluate", {"expression": "1+1"})
    assert action_of(obs("Runtime.evaluate", {"expression": "x //# sourceURL=__playwright_x"})) is None
    assert action_of(obs("Page.captureScreenshot", {})) == ("screenshot", {"format": "png"})


def test_many_messages_do_not_grow_memory() -> None:
    core = RelayCore(Clock())
    a = attach(core, "SA")
    core.from_browser(json.dumps({"method": "Target.attachedToTarget", "sessionId": "SA",
                                  "params": {"sessionId": "P", "targetInfo": {"type": "page"}}}))

    def burst(n: int, base: int) -> None:
        for i in range(base, base + n):
            core.from_client(a, json.dumps({"id": i, "method": "Runtime.evaluate", "sessionId": "P",
                                            "params": {"expression": "1+1"}}).encode())
            core.from_browser(json.dumps({"id": i, "sessionId": "P", "result": {"result": {"value": 2}}}))
            core.from_browser(b'{"method": "Network.dataReceived", "sessionId": "P", "params": {}}')
            core.take_observations()

    burst(2000, 0)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    burst(20000, 10_000)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, grown


def test_status_table() -> None:
    assert allowed("creating", "running") and allowed("running", "cancelled")
    assert not allowed("running", "creating") and not allowed("completed", "running")
    for terminal in ("completed", "failed", "cancelled"):
        assert TRANSITIONS[terminal] == frozenset()
    assert end_status_of("deleted") == "cancelled"
    assert end_status_of("idle_timeout") == "completed"
    assert end_status_of("browser_exited") == "failed"


# -- property: whatever the interleaving, a client only ever receives its own traffic ----------

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3)),
    st.tuples(st.just("remove"), st.integers(0, 3)),
    st.tuples(st.just("attach_child"), st.integers(0, 3)),
    st.tuples(st.just("command"), st.integers(0, 3)),
    st.tuples(st.just("steal"), st.integers(0, 3)),
    st.tuples(st.just("event"), st.integers(0, 20)),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_no_client_ever_sees_another_clients_sessions(ops: list[tuple[str, int]]) -> None:
    core = RelayCore(Clock())
    slots: list[int | None] = [None] * 4
    owned: dict[int, set[str]] = {}
    roots: dict[int, str] = {}
    counter = 0
    for op, arg in ops:
        counter += 1
        client = slots[arg % 4]
        if op == "add" and client is None:
            slots[arg] = attach(core, f"ROOT{counter}")
            roots[slots[arg]] = f"ROOT{counter}"
            owned[slots[arg]] = {f"ROOT{counter}"}
        elif op == "remove" and client is not None:
            core.remove_client(client)
            slots[arg] = None
            owned.pop(client)
        elif op == "attach_child" and client is not None:
            child = f"CHILD{counter}"
            outs = core.from_browser(json.dumps({"method": "Target.attachedToTarget",
                                                 "sessionId": roots[client], "params": {"sessionId": child}}))
            assert [o.dest for o in outs] == [client]
            owned[client].add(child)
        elif op == "command" and client is not None:
            raw = json.dumps({"id": counter, "method": "X"}).encode()
            for dest, msg in parse(core.from_client(client, raw)):
                assert dest == BROWSER and msg["sessionId"] == roots[client]
        elif op == "steal" and client is not None:
            foreign = [s for c, ss in owned.items() if c != client for s in ss]
            if foreign:
                raw = json.dumps({"id": counter, "method": "X", "sessionId": foreign[0]}).encode()
                [(dest, msg)] = parse(core.from_client(client, raw))
                assert dest == client and "error" in msg  # refused, never forwarded
        elif op == "event":
            sessions = sorted(s for ss in owned.values() for s in ss)
            if sessions:
                session = sessions[arg % len(sessions)]
                outs = core.from_browser(json.dumps({"method": "E", "sessionId": session}))
                [owner] = [c for c, ss in owned.items() if session in ss]
                assert [o.dest for o in outs] == [owner]
