"""Spawn budgets, permission narrowing, TTL and cascading stop; channels, soul, context, me,
coordinator config, lifecycle events and the OpenAPI document, over real HTTP."""

from __future__ import annotations

import time
from typing import Any

import httpx
import trio

from dovecote.bus import BusEndpoints, open_bus
from dovecote.bus.messages.events import EventList, ListEvents
from dovecote.services.supervisor import bus_socket_dir
from tests.agents.helpers import Agent, Operator, assert_diagnostic
from tests.helpers.suite import Suite


def spawn(parent: Agent, suite: Suite, **body: Any) -> tuple[httpx.Response, Agent | None]:
    response = parent.post("/api/agent/spawn", {"agent_name": "child", **body})
    if response.status_code != 201 or not response.json()["spawn"]["token"]:
        return response, None
    spawned = response.json()["spawn"]
    return response, Agent(suite, spawned["session"], spawned["token"])


def test_spawn_budgets_permissions_ttl_and_cascading_stop(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws = ops.workspace()
    ops.post("/v1/agent/coordinator", None)  # no body: 400, nothing changed
    coord = ops.browser.send(
        "PUT",
        "/v1/agent/coordinator",
        {"workspace_id": ws, "max_children": 2, "max_depth": 2, "max_active_sessions_per_workspace": 6},
    )
    assert coord.status_code == 200 and coord.json()["coordinator"]["source"] == "workspace", coord.text
    root = ops.session(ws, "lead", permissions={"tools": ["read", "write"], "network_channels": ["egress"]})

    response, child = spawn(
        root, agents_suite, spawn_role="worker", permissions={"tools": ["read"]}, idempotency_key="k1"
    )
    assert response.status_code == 201 and child is not None, response.text
    body = response.json()["spawn"]
    lineage = body["lineage"]
    assert lineage["root_session_id"] == root.id and lineage["parent_session_id"] == root.id
    assert lineage["spawn_depth"] == 1 and lineage["spawn_role"] == "worker"
    assert body["permissions"]["tools"] == ["read"] and body["permissions"]["network_channels"] == ["egress"]
    assert body["session"]["type"] == "spawned" and child.get("/api/agent/me").status_code == 200
    # the same idempotency key: the same child, no new token
    again = root.post("/api/agent/spawn", {"agent_name": "child", "idempotency_key": "k1"})
    assert again.status_code == 201 and again.json()["spawn"]["session"]["id"] == child.id
    assert again.json()["spawn"]["token"] is None

    assert_diagnostic(
        root.post("/api/agent/spawn", {"agent_name": "x", "permissions": {"tools": ["exec"]}}),
        403,
        "permission_not_narrower",
    )
    assert_diagnostic(
        child.post("/api/agent/spawn", {"agent_name": "x", "permissions": {"tools": ["write"]}}),
        403,
        "permission_not_narrower",
    )
    assert_diagnostic(
        root.post("/api/agent/spawn", {"agent_name": "x", "colour": "red"}), 422, "unknown_field"
    )

    _, grandchild = spawn(child, agents_suite, ttl_seconds=600)
    assert grandchild is not None
    assert_diagnostic(grandchild.post("/api/agent/spawn", {"agent_name": "x"}), 409, "max_depth")
    _, second = spawn(root, agents_suite, auto_stop_on_parent=False)
    assert second is not None
    assert_diagnostic(root.post("/api/agent/spawn", {"agent_name": "x"}), 409, "max_children")
    _, sibling = spawn(second, agents_suite)
    _, cousin = spawn(second, agents_suite)
    assert sibling is not None and cousin is not None  # 6 active now: the workspace's budget
    assert_diagnostic(child.post("/api/agent/spawn", {"agent_name": "x"}), 409, "max_active_per_workspace")

    # TTL: a one-second child ends by itself, with ttl_expires_at set.
    ops.stop(cousin.id)
    response, short = spawn(second, agents_suite, ttl_seconds=1)
    assert short is not None and response.json()["spawn"]["lineage"]["ttl_expires_at"] is not None
    deadline = time.monotonic() + 10
    while ops.get(f"/v1/agent/sessions/{short.id}")["session"]["state"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert ops.get(f"/v1/agent/sessions/{short.id}")["session"]["stop_reason"] == "ttl_expired"
    assert_diagnostic(short.get("/api/agent/me"), 401, "identity_stale")

    # Cascading stop: root's auto-stop descendants go (children first), "second" and its child stay.
    stopped = ops.stop(root.id)
    assert stopped["state"] == "stopped" and stopped["stop_reason"] == "operator_stop"
    states = {
        a.id: ops.get(f"/v1/agent/sessions/{a.id}")["session"] for a in (child, grandchild, second, sibling)
    }
    assert states[child.id]["state"] == states[grandchild.id]["state"] == "stopped"
    assert states[child.id]["stop_reason"] == "parent_stopped"
    assert states[second.id]["state"] == states[sibling.id]["state"] == "active"
    for gone in (root, child, grandchild):
        assert_diagnostic(gone.get("/api/agent/me"), 401, "identity_stale")
    detail = ops.get(f"/v1/agent/sessions/{root.id}")
    assert {c["id"] for c in detail["children"]} == {child.id, second.id}

    # Each stop was recorded once, children first, in the team's event log. The agents
    # service sends its lifecycle events in batches at most every 100 ms: the last stop's
    # batch may still be on its way when the stop answers.
    deadline = time.monotonic() + 10
    while True:
        events = team_events(agents_suite, root)
        stops = [e.event.resource.id for e in events if e.event.event == "agent.session.stopped"]
        if root.id in stops or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert stops.count(root.id) == stops.count(child.id) == stops.count(grandchild.id) == 1
    assert stops.index(grandchild.id) < stops.index(child.id) < stops.index(root.id)


def team_events(suite: Suite, agent: Agent) -> list[Any]:
    """The agent.* events of the session's team, from the notifier's log (what SSE streams replay)."""

    async def read() -> EventList:
        async with open_bus(BusEndpoints.local(bus_socket_dir(suite.data_dir)), name="tests.agents") as bus:
            team = await team_of(bus, agent)
            out = EventList(events=[], last_id=0)
            with trio.fail_after(10):
                while True:
                    page = await bus.request(
                        "notifier", ListEvents(team_id=team, after=out.last_id, limit=500)
                    )
                    out.events.extend(page.events)
                    if not page.events:
                        return out
                    out.last_id = page.events[-1].id

    return [e for e in trio.run(read).events if e.event.event.startswith("agent.")]


async def team_of(bus: Any, agent: Agent) -> str:
    page = await bus.request("notifier", ListEvents(team_id="", after=0, limit=500))
    for e in page.events:
        if e.event.resource.id == agent.id:
            return str(e.team_id)
    raise AssertionError("no event names the session")


def test_channels_reply_idempotency_and_long_poll(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws = ops.workspace()
    a, b = ops.session(ws, "a"), ops.session(ws, "b")
    run = ops.run(ops.task(ws))
    chan = run["coordination_channel_id"]
    listed = a.get("/api/agent/channels").json()["channels"]
    assert [c["id"] for c in listed] == [chan] and "status" in listed[0]["allowed_message_kinds"]
    md = {
        "task_id": run["task_id"],
        "run_id": run["id"],
        "coordination_channel_id": chan,
        "correlation_id": "c1",
        "message_kind": "request",
        "ext": {"topic": "x"},
    }
    first = a.post(
        f"/api/agent/channels/{chan}/send", {"metadata": md, "body": "hi", "idempotency_key": "once"}
    )
    repeat = a.post(
        f"/api/agent/channels/{chan}/send", {"metadata": md, "body": "hi", "idempotency_key": "once"}
    )
    assert first.status_code == repeat.status_code == 202
    assert first.json()["message"]["message_id"] == repeat.json()["message"]["message_id"]
    got = b.get(f"/api/agent/channels/{chan}/recv").json()["messages"]
    assert [m["body"] for m in got] == ["hi"]
    reply = b.post("/api/agent/channels/reply", {"reply_to_message_id": got[0]["message_id"], "body": "yes"})
    assert reply.status_code == 202, reply.text
    rmd = reply.json()["message"]["metadata"]
    assert rmd["message_kind"] == "reply" and rmd["correlation_id"] == "c1" and rmd["ext"] == {"topic": "x"}
    assert reply.json()["message"]["to_session_id"] == a.id
    # a long poll returns as soon as a message comes, in order, each once
    results: dict[str, Any] = {}

    async def poll_and_send() -> None:
        async with httpx.AsyncClient(base_url=agents_suite.url, headers=b.headers(), timeout=30) as client:

            async def poll() -> None:
                began = time.monotonic()
                r = await client.get(f"/api/agent/channels/{chan}/recv", params={"wait": "5", "limit": 10})
                results["poll"] = (r, time.monotonic() - began)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.5)
                async with httpx.AsyncClient(
                    base_url=agents_suite.url, headers=a.headers(), timeout=30
                ) as sender:
                    for i in range(3):
                        r = await sender.post(
                            f"/api/agent/channels/{chan}/send",
                            json={"metadata": {**md, "message_kind": "status"}, "body": i},
                        )
                        assert r.status_code == 202

    trio.run(poll_and_send)
    response, waited = results["poll"]
    assert response.status_code == 200 and 0.4 < waited < 4.5, waited
    rest = b.get(f"/api/agent/channels/{chan}/recv", params={"limit": 10}).json()["messages"]
    assert [m["body"] for m in response.json()["messages"] + rest] == [0, 1, 2]
    # a reader sees the reply addressed to it; the other reader does not
    assert [m["body"] for m in a.get(f"/api/agent/channels/{chan}/recv").json()["messages"]] == ["yes"]
    began = time.monotonic()
    assert b.get(f"/api/agent/channels/{chan}/recv", params={"wait": "0.3"}).json()["messages"] == []
    assert time.monotonic() - began >= 0.25


SOUL = """---
role: reviewer
tone: [direct]
principles: [read first]
version: 1
---
Review with care.
"""


def test_soul_context_me_and_coordinator(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws = ops.workspace("home")
    agent = ops.session(ws, "reviewer", channel="general", capabilities=["python"])
    peer = ops.session(ws, "writer")
    missing = agent.get("/api/agent/soul").json()
    assert missing["present"] is False and missing["validation_status"] == "missing"
    stored = ops.browser.send(
        "PUT",
        "/v1/agent/souls/reviewer",
        None,
        content=SOUL.encode(),
        headers={"Content-Type": "text/markdown"},
    )
    assert stored.status_code == 200, stored.text
    soul = agent.get("/api/agent/soul").json()
    assert (
        soul["valid"] and soul["validation_status"] == "valid" and soul["frontmatter"]["role"] == "reviewer"
    )
    assert soul["revision_id"] == stored.json()["soul"]["revision_id"] and soul["digest"].startswith(
        "sha256:"
    )
    bad = agent.post("/api/agent/soul/validate", {"content": "---\nrole: [x]\n---\n"}).json()
    assert not bad["valid"] and bad["diagnostics"][0] | {"message": ""} == {
        "code": "invalid_type",
        "line": 2,
        "column": 1,
        "field": "role",
        "severity": "error",
        "message": "",
        "section": "frontmatter",
        "owner_surface": "soul",
        "source_path": "",
    }

    ops.run(ops.task(ws, "review it"))
    claim = agent.claim(lease_seconds=120).json()["claim"]
    md = {
        "task_id": claim["task"]["id"],
        "run_id": claim["run"]["id"],
        "correlation_id": "c",
        "coordination_channel_id": claim["coordination_channel"]["id"],
        "message_kind": "status",
    }
    peer.post(f"/api/agent/channels/{md['coordination_channel_id']}/send", {"metadata": md, "body": "note"})

    me = agent.get("/api/agent/me").json()["me"]
    assert me["self"] == {"agent_name": "reviewer", "model": "", "provider": "", "session_id": agent.id}
    assert me["workspace"]["id"] == ws and me["coordinator"]["source"] == "default"
    assert [lease["run_id"] for lease in me["active_task_leases"]] == [claim["run"]["id"]]
    assert me["capabilities"] == [{"id": "python", "source": "session", "summary": ""}]

    ctx = agent.get("/api/agent/context").json()["context"]
    assert ctx["task"]["available"] and ctx["task"]["bundle"]["current_run"]["id"] == claim["run"]["id"]
    assert ctx["coordination_channel"]["channel"]["id"] == md["coordination_channel_id"]
    assert ctx["inbox_summary"]["unread_count"] == 1 and ctx["inbox_summary"]["items"][0]["preview"] == "note"
    assert [p["session_id"] for p in ctx["peer_roster"]["peers"]] == [peer.id]
    assert ctx["peer_roster"]["section"] == {"limit": 20, "returned": 1, "truncated": False}
    assert ctx["soul"]["role"] == "reviewer" and ctx["soul"]["principles"] == ["read first"]
    assert ctx["session"]["lineage"]["root_session_id"] == agent.id and ctx["provenance"]["source"]
    assert "clm_" not in httpx.Response(200, json=ctx).text

    config = agent.get("/api/agent/coordinator/config", params={"workspace": "home"})
    assert config.status_code == 200 and config.json()["coordinator"]["workspace_id"] == ws
    assert_diagnostic(
        agent.get("/api/agent/coordinator/config", params={"workspace": "elsewhere"}),
        403,
        "workspace_forbidden",
    )


def test_the_agent_routes_are_documented(agents_suite: Suite) -> None:
    doc = httpx.get(agents_suite.url + "/openapi.json", timeout=10).json()
    served = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    expected = {
        ("get", "/api/agent/channels"),
        ("post", "/api/agent/channels/reply"),
        ("get", "/api/agent/channels/{channel}/recv"),
        ("post", "/api/agent/channels/{channel}/send"),
        ("get", "/api/agent/context"),
        ("get", "/api/agent/coordinator/config"),
        ("get", "/api/agent/me"),
        ("get", "/api/agent/soul"),
        ("post", "/api/agent/soul/validate"),
        ("post", "/api/agent/spawn"),
        ("post", "/api/agent/tasks/claim-next"),
        ("post", "/api/agent/tasks/{run_id}/complete"),
        ("post", "/api/agent/tasks/{run_id}/fail"),
        ("post", "/api/agent/tasks/{run_id}/heartbeat"),
        ("post", "/api/agent/tasks/{run_id}/release"),
        ("post", "/v1/agent/workspaces"),
        ("get", "/v1/agent/workspaces"),
        ("post", "/v1/agent/sessions"),
        ("get", "/v1/agent/sessions"),
        ("get", "/v1/agent/sessions/{id}"),
        ("post", "/v1/agent/sessions/{id}/stop"),
        ("post", "/v1/agent/tasks"),
        ("get", "/v1/agent/tasks"),
        ("get", "/v1/agent/tasks/{id}"),
        ("post", "/v1/agent/tasks/{id}/runs"),
        ("get", "/v1/agent/runs/{id}"),
        ("put", "/v1/agent/souls/{agent_name}"),
        ("put", "/v1/agent/coordinator"),
    }
    assert expected <= served, expected - served
    claim = doc["paths"]["/api/agent/tasks/claim-next"]["post"]["responses"]
    assert {"200", "204"} <= set(claim)
    run_schema = doc["components"]["schemas"]["Run"]
    assert "claim_token_hash" in run_schema["properties"] and "claim_token" not in run_schema["properties"]
    statuses = run_schema["properties"]["status"]["enum"]
    assert sorted(statuses) == sorted(
        ["queued", "claimed", "starting", "running", "completed", "failed", "canceled", "needs_attention"]
    )
