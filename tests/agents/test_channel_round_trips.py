"""Channel send and recv in one round trip to PostgreSQL (``services/agents/channels.py``).

A send without an idempotency key is one statement that takes the channel's
next seq only when the message is acceptable; a refused one (unknown
channel, an addressee outside the workspace, metadata of another task) still
gets its precise answer and leaves no trace in the order the readers see.
A recv is one pipelined transaction: readers of one session calling at once
on a fresh cursor still get each message once.
"""

from __future__ import annotations

import threading
from typing import Any

from tests.agents.helpers import Operator, assert_diagnostic
from tests.helpers.suite import Suite


def test_refused_sends_keep_their_answers_and_leave_the_order_intact(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws, elsewhere = ops.workspace(), ops.workspace("other")
    a, b, c = ops.session(ws, "a"), ops.session(ws, "b"), ops.session(ws, "c")
    stranger = ops.session(elsewhere, "s")
    run = ops.run(ops.task(ws))
    chan = run["coordination_channel_id"]
    md = {"task_id": run["task_id"], "run_id": run["id"], "coordination_channel_id": chan,
          "correlation_id": "c", "message_kind": "status"}
    path = f"/api/agent/channels/{chan}/send"

    def send(body: Any, **extra: Any) -> Any:
        return a.post(path, {"metadata": md, "body": body, **extra})

    assert send(0).status_code == 202
    assert_diagnostic(send("x", to_session_id=stranger.id), 404, "session_not_found")
    assert send(1).status_code == 202
    assert_diagnostic(a.post(path, {"metadata": {**md, "task_id": "tsk_other"}, "body": "x"}), 422,
                      "metadata_mismatch")
    assert_diagnostic(
        a.post("/api/agent/channels/ch_nope/send",
               {"metadata": {**md, "coordination_channel_id": "ch_nope"}, "body": "x"}),
        404, "channel_not_found")
    only_b = send("for b", to_session_id=b.id)
    assert only_b.status_code == 202 and only_b.json()["message"]["to_session_id"] == b.id
    assert send(2).status_code == 202

    assert [m["body"] for m in b.get(f"/api/agent/channels/{chan}/recv").json()["messages"]] == [
        0, 1, "for b", 2]
    assert [m["body"] for m in c.get(f"/api/agent/channels/{chan}/recv").json()["messages"]] == [0, 1, 2]
    assert b.get(f"/api/agent/channels/{chan}/recv").json()["messages"] == []
    assert_diagnostic(b.get("/api/agent/channels/ch_nope/recv"), 404, "channel_not_found")


def test_concurrent_recv_calls_of_one_session_get_each_message_once(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws = ops.workspace()
    a, b = ops.session(ws, "a"), ops.session(ws, "b")
    run = ops.run(ops.task(ws))
    chan = run["coordination_channel_id"]
    md = {"task_id": run["task_id"], "run_id": run["id"], "coordination_channel_id": chan,
          "correlation_id": "c", "message_kind": "status"}
    for i in range(12):
        assert a.post(f"/api/agent/channels/{chan}/send", {"metadata": md, "body": i}).status_code == 202
    barrier = threading.Barrier(6)
    got: list[list[int]] = []

    def read() -> None:
        barrier.wait(timeout=30)
        response = b.get(f"/api/agent/channels/{chan}/recv", params={"limit": 3})
        assert response.status_code == 200, response.text
        got.append([m["body"] for m in response.json()["messages"]])

    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 6
    received = [body for batch in got for body in batch]
    assert sorted(received) == list(range(12))  # each once, none lost
    assert all(batch == sorted(batch) for batch in got)
