"""The agent runtime over real HTTP against ``dovecote up``: the reference's lease lifecycle,
the identity matrix, team isolation and concurrent claims."""

from __future__ import annotations

import threading
import time

import httpx

from tests.agents.helpers import Agent, Operator, assert_diagnostic, assert_no_raw_claim_token
from tests.helpers.suite import Suite


def test_the_reference_lease_lifecycle(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws = ops.workspace()
    agent, peer = ops.session(ws, "worker"), ops.session(ws, "reviewer")
    task_id = ops.task(ws, "write the report", priority="high")
    queued = ops.run(task_id)
    assert queued["status"] == "queued" and queued["attempt"] == 1

    # claim-next: the run, its lease and coordination channel; a token hash, never a token.
    response = agent.claim(lease_seconds=30)
    assert response.status_code == 200, response.text
    claim = response.json()["claim"]
    assert_no_raw_claim_token(claim)
    run, lease, channel = claim["run"], claim["lease"], claim["coordination_channel"]
    assert run["id"] == queued["id"] and run["status"] == "claimed"
    assert len(lease["claim_token_hash"]) == 64 and lease["claim_token_hash"] == run["claim_token_hash"]
    assert lease["claimed_by"] == {"kind": "agent_session", "ref": agent.id}
    assert channel["id"] == run["coordination_channel_id"] and channel["run_id"] == run["id"]
    assert claim["task"]["id"] == task_id and claim["task"]["status"] == "in_progress"

    response = agent.post(f"/api/agent/tasks/{run['id']}/heartbeat", {"lease_seconds": 60})
    assert response.status_code == 200, response.text
    beat = response.json()["lease"]
    assert beat["status"] == "claimed" and beat["lease_until"] > lease["lease_until"]

    # a status message on the run's channel: echoed metadata, received by the second session.
    metadata = {
        "task_id": task_id,
        "run_id": run["id"],
        "coordination_channel_id": channel["id"],
        "correlation_id": "corr-1",
        "message_kind": "status",
    }
    response = agent.post(
        f"/api/agent/channels/{channel['id']}/send", {"metadata": metadata, "body": {"progress": 0.5}}
    )
    assert response.status_code == 202, response.text
    sent = response.json()["message"]
    assert {k: sent["metadata"][k] for k in metadata} == metadata
    assert sent["from_session_id"] == agent.id
    response = peer.get(f"/api/agent/channels/{channel['id']}/recv", params={"wait": "true", "limit": 10})
    assert response.status_code == 200, response.text
    assert [m["message_id"] for m in response.json()["messages"]] == [sent["message_id"]]
    assert response.json()["messages"][0]["body"] == {"progress": 0.5}
    # delivered once to that reader
    again = peer.get(f"/api/agent/channels/{channel['id']}/recv", params={"limit": 10})
    assert again.status_code == 200 and again.json()["messages"] == []

    response = agent.post(f"/api/agent/tasks/{run['id']}/complete", {"result": {"ok": True}})
    assert response.status_code == 200, response.text
    assert response.json()["lease"]["status"] == "completed"
    assert_diagnostic(
        agent.post(f"/api/agent/tasks/{run['id']}/complete", {"result": {"ok": True}}),
        409,
        "lease_not_active",
    )
    assert (
        agent.post(f"/api/agent/tasks/{run['id']}/complete", {"result": {"ok": True}}).json()["error"]
        == "not an active lease"
    )
    response = agent.claim()
    assert response.status_code == 204 and response.content == b""
    done = ops.get(f"/v1/agent/runs/{run['id']}")["run"]
    assert done["status"] == "completed" and done["result"] == {"ok": True}
    assert ops.get(f"/v1/agent/tasks/{task_id}")["task"]["status"] == "completed"

    # a one-second lease left to expire: heartbeat and fail are 409 "lease expired"; the sweeper requeues it.
    second = ops.run(task_id)
    response = agent.claim(lease_seconds=1)
    assert response.status_code == 200 and response.json()["claim"]["run"]["id"] == second["id"]
    time.sleep(1.3)
    for action in ("heartbeat", "fail"):
        response = agent.post(f"/api/agent/tasks/{second['id']}/{action}", {"error": "late"})
        assert_diagnostic(response, 409, "lease_expired")
        assert response.json()["error"] == "lease expired"
    deadline = time.monotonic() + 10
    while (swept := ops.get(f"/v1/agent/runs/{second['id']}")["run"])["status"] != "queued":
        assert time.monotonic() < deadline, swept
        time.sleep(0.1)
    assert swept["attempt"] == 2 and swept["claim_token_hash"] is None
    # requeued work goes to whoever claims next; the old holder's lease stays expired.
    response = peer.claim()
    assert response.status_code == 200 and response.json()["claim"]["run"]["id"] == second["id"]
    assert_diagnostic(
        agent.post(f"/api/agent/tasks/{second['id']}/complete", {"result": {}}), 409, "lease_not_active"
    )
    assert (
        peer.post(f"/api/agent/tasks/{second['id']}/release", {"reason": "done for today"}).json()["lease"][
            "status"
        ]
        == "queued"
    )


def test_lease_bounds_bodies_and_raw_tokens(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws = ops.workspace()
    agent = ops.session(ws)
    ops.run(ops.task(ws))
    assert_diagnostic(agent.claim(lease_seconds=3601), 422, "lease_seconds_out_of_range")
    response = agent.http.post("/api/agent/tasks/claim-next", content=b"")
    assert response.status_code == 400 and "diagnostic" in response.json()
    run = agent.claim(lease_seconds=30).json()["claim"]["run"]
    response = agent.http.post(f"/api/agent/tasks/{run['id']}/heartbeat", content=b"")
    assert response.status_code == 400, response.text
    assert_diagnostic(
        agent.post(f"/api/agent/tasks/{run['id']}/complete", {"result": {"nested": [{"claim_token": "x"}]}}),
        422,
        "claim_token_forbidden",
    )
    assert_diagnostic(agent.post("/api/agent/tasks/run_nope/heartbeat", {}), 404, "run_not_found")
    metadata = {
        "task_id": run["task_id"],
        "run_id": run["id"],
        "coordination_channel_id": run["coordination_channel_id"],
        "correlation_id": "c",
        "message_kind": "status",
    }
    path = f"/api/agent/channels/{run['coordination_channel_id']}/send"
    assert_diagnostic(
        agent.post(path, {"metadata": {**metadata, "ext": {"claim_token": "abc"}}}),
        422,
        "claim_token_forbidden",
    )
    assert_diagnostic(
        agent.post(path, {"metadata": metadata, "body": "clm_" + "a" * 43}), 422, "claim_token_forbidden"
    )
    assert_diagnostic(
        agent.post(path, {"metadata": {**metadata, "run_id": "run_other"}}), 422, "metadata_mismatch"
    )
    assert agent.post(path, {"metadata": {**metadata, "message_kind": "gossip"}}).status_code == 400
    missing = {k: v for k, v in metadata.items() if k != "correlation_id"}
    assert agent.post(path, {"metadata": missing}).status_code == 400
    assert agent.post(f"/api/agent/tasks/{run['id']}/complete", {"result": {"ok": 1}}).status_code == 200


def test_identity_matrix(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws, other_ws = ops.workspace("a"), ops.workspace("b")
    agent, stopped = ops.session(ws), ops.session(ws, "gone")
    ops.stop(stopped.id)
    assert agent.get("/api/agent/me").status_code == 200
    bare = httpx.Client(base_url=agents_suite.url, timeout=30)
    cases = [
        ({}, 401, "identity_required"),
        (agent.headers(**{"X-AGH-Session-ID": "as_unknown"}), 401, "identity_stale"),
        (stopped.headers(), 401, "identity_stale"),
        (agent.headers(**{"X-AGH-Agent": "someone-else"}), 401, "identity_mismatch"),
        (agent.headers(**{"X-AGH-Workspace-ID": other_ws}), 403, "identity_unauthorized"),
        ({k: v for k, v in agent.headers().items() if k != "Authorization"}, 401, "identity_proof_required"),
        (agent.headers(Authorization="Bearer agt_wrong"), 401, "identity_proof_invalid"),
        (agent.headers(Authorization=f"Bearer {stopped.token}"), 401, "identity_proof_invalid"),
    ]
    for headers, status, code in cases:
        for method, path, body in (
            ("GET", "/api/agent/me", None),
            ("POST", "/api/agent/tasks/claim-next", {}),
        ):
            response = bare.request(method, path, headers=headers, json=body)
            assert_diagnostic(response, status, code)
    assert agent.get("/api/agent/me", headers={"X-AGH-Workspace-ID": ws}).status_code == 200


def test_a_team_cannot_see_or_claim_another_teams_work(agents_suite: Suite) -> None:
    alpha, beta = Operator(agents_suite, "Alpha"), Operator(agents_suite, "Beta")
    ws_a, ws_b = alpha.workspace(), beta.workspace()
    agent_a, agent_b = alpha.session(ws_a), beta.session(ws_b)
    task_a = alpha.task(ws_a)
    run_a = alpha.run(task_a)
    assert agent_b.claim().status_code == 204
    # B's agent names A's workspace: refused; B's operator sees none of A's objects.
    assert_diagnostic(
        agent_b.get("/api/agent/me", headers={"X-AGH-Workspace-ID": ws_a}), 403, "identity_unauthorized"
    )
    assert agent_b.get("/api/agent/channels").json()["channels"] == []
    assert_diagnostic(
        agent_b.get(f"/api/agent/channels/{run_a['coordination_channel_id']}/recv"), 404, "channel_not_found"
    )
    for path in (
        f"/v1/agent/tasks/{task_a}",
        f"/v1/agent/runs/{run_a['id']}",
        f"/v1/agent/sessions/{agent_a.id}",
    ):
        assert beta.browser.get(path).status_code == 404, path
    assert (
        beta.post("/v1/agent/tasks", {"workspace_id": ws_a, "title": "x"}).get("error", {}).get("code")
        == "workspace_not_found"
    )
    assert (
        beta.post("/v1/agent/sessions", {"workspace_id": ws_a, "agent_name": "x"})["error"]["code"]
        == "workspace_not_found"
    )
    assert beta.get("/v1/agent/tasks")["tasks"] == [] and beta.get("/v1/agent/sessions")["sessions"] == [
        agent_b.session
    ]
    assert agent_a.claim().json()["claim"]["run"]["id"] == run_a["id"]
    assert_diagnostic(
        agent_b.post(f"/api/agent/tasks/{run_a['id']}/complete", {"result": {}}), 404, "run_not_found"
    )


def test_twenty_agents_claim_ten_runs_once(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws = ops.workspace()
    runs = {ops.run(ops.task(ws, f"t{i}"))["id"] for i in range(10)}
    agents = [ops.session(ws, f"agent-{i}") for i in range(20)]
    barrier = threading.Barrier(len(agents))
    results: dict[str, httpx.Response] = {}

    def claim(agent: Agent) -> None:
        barrier.wait(timeout=30)
        results[agent.id] = agent.claim(lease_seconds=60)

    threads = [threading.Thread(target=claim, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 20
    statuses = sorted(r.status_code for r in results.values())
    assert statuses == [200] * 10 + [204] * 10, statuses
    claimed = [r.json()["claim"]["run"]["id"] for r in results.values() if r.status_code == 200]
    assert sorted(claimed) == sorted(runs)
    holders = {ops.get(f"/v1/agent/runs/{rid}")["run"]["session_id"] for rid in runs}
    assert len(holders) == 10


def test_claim_next_waits_for_work(agents_suite: Suite) -> None:
    ops = Operator(agents_suite)
    ws = ops.workspace()
    agent = ops.session(ws)
    task = ops.task(ws)
    began = time.monotonic()
    assert agent.claim(wait_seconds=0.5).status_code == 204
    assert 0.4 < time.monotonic() - began < 5
    got: dict[str, httpx.Response] = {}
    waiter = threading.Thread(target=lambda: got.setdefault("r", agent.claim(wait=True)))
    waiter.start()
    time.sleep(0.5)
    run = ops.run(task)
    waiter.join(30)
    assert got["r"].status_code == 200 and got["r"].json()["claim"]["run"]["id"] == run["id"]
