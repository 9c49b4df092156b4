"""The gateway's ASGI fast path answers exactly as Quart does (``gateway/fastpath.py``).

The hot agent routes (``Route(fast=True)``) are served in front of Quart.
Here the same requests go, in this process, once through the app as
hypercorn calls it (the fast path) and once straight to Quart behind it
(``FastPath.app``), both on the suite's real bus and agents service: the
status, every header and the body (but the diagnostic's random id) must be
the same. Over real HTTP, a fast answer and a Quart answer carry the same
header set.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from dovecote.gateway.app import create_app
from dovecote.gateway.fastpath import FastPath
from dovecote.gateway.state import GatewayConfig
from dovecote.libs.config import load_config
from dovecote.services.client import open_cli_bus
from tests.agents.helpers import Agent, Operator, assert_diagnostic
from tests.helpers.suite import Suite

RID = "fast-path-test-1"


async def _asgi(app: Any, method: str, path: str, headers: dict[str, str], body: bytes = b"",
                query: str = "", queued: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One request through an ASGI app: status, headers (lower-case names), body.

    ``queued``: the body waits in a Trio channel, as hypercorn hands it over (the fast path takes it
    without a reader task); otherwise ``receive`` is a plain function (Quart's reader is used)."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if body and "content-length" not in {k.lower() for k in headers}:
        raw.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "", "headers": raw,
        "client": ("127.0.0.1", 1), "server": ("gateway", 80), "extensions": {},
    }
    sent = False
    started: dict[str, Any] = {}
    out = bytearray()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "http.response.start":
            started.update(event)
        else:
            out.extend(event.get("body", b""))

    into, out_of = trio.open_memory_channel[dict[str, Any]](10)
    into.send_nowait({"type": "http.request", "body": body, "more_body": False})
    with trio.fail_after(30):
        await app(scope, out_of.receive if queued else receive, send)
    names = {k.decode(): v.decode() for k, v in started["headers"]}
    assert len(names) == len(started["headers"]), started["headers"]  # no header twice
    return started["status"], names, bytes(out)


def _normal(body: bytes) -> Any:
    """The JSON body without what differs on every answer (a diagnostic's id, a lease's time)."""
    if not body:
        return None
    value = json.loads(body)
    if isinstance(value.get("diagnostic"), dict):
        value["diagnostic"].pop("id")
    if isinstance(value.get("lease"), dict):
        value["lease"].pop("lease_until", None)
        value["lease"].pop("heartbeat_at", None)
    return value


async def test_fast_answers_are_quarts_answers(agents_suite: Suite) -> None:
    ops = Operator(agents_suite, "Fast")
    ws = ops.workspace()
    agent, other = ops.session(ws, "fast-a"), ops.session(ws, "fast-b")
    run = ops.run(ops.task(ws))
    channel = run["coordination_channel_id"]
    claimed = agent.claim(lease_seconds=120)
    assert claimed.status_code == 200, claimed.text
    run_id = claimed.json()["claim"]["run"]["id"]
    done = ops.run(ops.task(ws, "done"))
    got = other.claim()
    assert got.status_code == 200 and got.json()["claim"]["run"]["id"] == done["id"], got.text
    assert other.post(f"/api/agent/tasks/{done['id']}/complete", {"result": {}}).status_code == 200

    me = {**agent.headers(), "X-Request-Id": RID, "Content-Type": "application/json"}
    js = b'{"lease_seconds": 60}'
    cases: list[tuple[str, str, dict[str, str], bytes, str]] = [
        ("POST", "/api/agent/tasks/claim-next", {"X-Request-Id": RID}, b"{}", ""),  # 401 identity_required
        ("POST", "/api/agent/tasks/claim-next", {**me, "Authorization": "Bearer agt_no"}, b"{}", ""),
        ("POST", "/api/agent/tasks/claim-next", me, b"{}", ""),  # 204: nothing queued
        ("POST", "/api/agent/tasks/claim-next", me, b"", ""),  # 400: a body is required
        ("POST", "/api/agent/tasks/claim-next", me, b"{not json", ""),
        ("POST", "/api/agent/tasks/claim-next", {**me, "Content-Type": "text/plain"}, b"{}", ""),  # 415
        ("POST", "/api/agent/tasks/claim-next", me, b'{"lease_seconds": "x"}', ""),
        ("POST", "/api/agent/tasks/claim-next", me, b'{"lease_seconds": 100000000}', ""),  # 422
        ("POST", "/api/agent/tasks/claim-next", {**me, "Content-Length": str(64 * 1024 * 1024)},
         b"{}", ""),  # 413 (a lying length: closed or not, as the body's reader is first or not)
        ("POST", "/api/agent/tasks/claim-next", me, b'{"x": "\\u0000"}', ""),  # 400 NUL
        ("POST", f"/api/agent/tasks/{run_id}/heartbeat", me, js, ""),  # 200
        ("POST", f"/api/agent/tasks/{run_id}/heartbeat", {**me, "X-Request-Id": "has space"}, js, ""),
        ("POST", f"/api/agent/tasks/{done['id']}/heartbeat", me, js, ""),  # 409 not yours / ended
        ("POST", f"/api/agent/tasks/{done['id']}/complete", me, b'{"result": 1}', ""),
        ("POST", "/api/agent/tasks/run_nope/fail", me, b'{"error": "x"}', ""),
        ("POST", "/api/agent/tasks/run_nope/release", me, b"{}", ""),
        ("POST", "/api/agent/tasks/run\x00x/release", me, b"{}", ""),  # NUL in the path
        ("POST", f"/api/agent/channels/{channel}/send", me, b'{"body": 1}', ""),  # 400 no metadata
        ("POST", "/api/agent/channels/ch_nope/send", me,
         b'{"metadata": {"kind": "status"}, "body": 1}', ""),
        ("GET", f"/api/agent/channels/{channel}/recv", me, b"", "wait=0"),  # 200, nothing unread
        ("GET", f"/api/agent/channels/{channel}/recv", me, b"", "wait=abc"),  # 400
        ("GET", f"/api/agent/channels/{channel}/recv", me, b"", "limit=1%00"),  # NUL in the query
        ("GET", "/api/agent/channels/ch_nope/recv", me, b"", ""),  # 404
    ]
    config = load_config(GatewayConfig, {"DOVECOTE_DATA_DIR": str(agents_suite.data_dir)})
    async with open_cli_bus(agents_suite.data_dir) as bus:
        app = create_app(config, bus)
        fast = app.asgi_app
        assert isinstance(fast, FastPath)
        for method, path, headers, body, query in cases:
            scope = {"type": "http", "method": method, "path": path}
            assert fast.match(scope) is not None, path
            q_status, q_headers, q_body = await _asgi(fast.app, method, path, headers, body, query)
            for queued in (False, True):
                f_status, f_headers, f_body = await _asgi(app, method, path, headers, body, query,
                                                          queued)
                what = (f"{method} {path}?{query} {body[:40]!r} queued={queued}: {f_body[:300]!r} / "
                        f"{q_body[:300]!r}")
                assert f_status == q_status, what
                assert _normal(f_body) == _normal(q_body), what
                q_seen = dict(q_headers)
                if headers.get("X-Request-Id") != RID:  # a new id on each answer
                    assert len(f_headers.pop("x-request-id")) == len(q_seen.pop("x-request-id")) == 16
                if f_status == 200 and "heartbeat" in path:  # lease_until's digits may differ in length
                    f_headers.pop("content-length"), q_seen.pop("content-length")
                if f_status == 413:
                    f_headers.pop("connection", None), q_seen.pop("connection", None)
                assert f_headers == q_seen, what
        # a route that is not fast, another method, HEAD: Quart's, untouched
        for scope in ({"type": "http", "method": "GET", "path": "/api/agent/me"},
                      {"type": "http", "method": "GET", "path": "/api/agent/tasks/claim-next"},
                      {"type": "http", "method": "POST", "path": "/api/agent/tasks/claim-next/"},
                      {"type": "http", "method": "HEAD", "path": f"/api/agent/channels/{channel}/recv"}):
            assert fast.match(scope) is None, scope
        status, headers, _ = await _asgi(app, "GET", "/api/agent/tasks/claim-next", me)
        assert status == 405 and "POST" in headers["allow"]


def test_fast_and_quart_answers_carry_the_same_headers(agents_suite: Suite) -> None:
    ops = Operator(agents_suite, "Headers")
    ws = ops.workspace()
    agent: Agent = ops.session(ws, "hdr")
    run = ops.run(ops.task(ws))
    claimed = agent.claim()  # fast
    assert claimed.status_code == 200, claimed.text
    beat = agent.post(f"/api/agent/tasks/{run['id']}/heartbeat", {}, headers={"X-Request-Id": "r-1"})
    me = agent.get("/api/agent/me", headers={"X-Request-Id": "r-2"})  # Quart
    assert beat.status_code == me.status_code == 200
    assert set(beat.headers) == set(me.headers) == set(claimed.headers)
    assert (beat.headers["x-request-id"], me.headers["x-request-id"]) == ("r-1", "r-2")
    assert beat.headers["content-type"] == me.headers["content-type"] == "application/json"
    bare = httpx.Client(base_url=agents_suite.url, timeout=30)
    refused_fast = bare.post("/api/agent/tasks/claim-next", json={})
    refused_quart = bare.get("/api/agent/me")
    assert_diagnostic(refused_fast, 401, "identity_required")
    assert_diagnostic(refused_quart, 401, "identity_required")
    assert set(refused_fast.headers) == set(refused_quart.headers)
    assert len(refused_fast.headers["x-request-id"]) == 16
    # Both kinds are counted in the gateway's HTTP metrics, by route template.
    metrics = bare.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    counted = [line for line in metrics.text.splitlines()
               if line.startswith("dovecote_http_requests_total{") and 'status="200"' in line]
    assert any('route="/api/agent/tasks/<run_id>/heartbeat"' in line for line in counted), counted
    assert any('route="/api/agent/me"' in line for line in counted), counted
    bare.close()
    agent.close()


def test_the_fast_table_is_the_route_tables_fast_entries() -> None:
    """Each fast route is a declared, documented operation, served by the view Quart serves for it."""
    from dovecote.gateway.routes.agents import AGENT_ROUTES

    app = create_app(load_config(GatewayConfig, {"DOVECOTE_DATA_DIR": "/nonexistent"}), bus=None)
    fast = app.asgi_app
    assert isinstance(fast, FastPath)
    declared = {(r.method, r.path.replace("{", "<").replace("}", ">")) for r in AGENT_ROUTES if r.fast}
    assert {(r.method, r.rule) for r in fast.routes} == declared
    assert len(declared) == 7
    documented = app.extensions["dovecote"].api.document()["paths"]
    for route in fast.routes:
        rules = [rule for rule in app.url_map.iter_rules()
                 if rule.rule == route.rule and route.method in (rule.methods or ())]
        assert len(rules) == 1, route.rule
        assert app.view_functions[rules[0].endpoint] is route.view
        path = route.rule.replace("<", "{").replace(">", "}")
        assert route.method.lower() in documented[path], path
    assert {r.rule for r in fast.routes if r.long_poll} == {
        "/api/agent/tasks/claim-next", "/api/agent/channels/<channel>/recv"}
