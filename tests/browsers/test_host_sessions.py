"""Browser sessions on the host provider, end to end, against ``dovecote up``.

Everything is real: Chromium in a bubblewrap sandbox as an unprivileged user,
the CDP relay over the bus and the gateway's WebSocket, Playwright driving it
with ``connect_over_cdp``, PostgreSQL, a moto S3 server for artifacts, and an
OpenAI-compatible model server (a scripted test double) for the planner. The
sandbox has no network, so pages are ``data:`` URLs. One suite for the module;
the tests run in file order and share the first session.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import av
import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.browsers.helpers import (
    BASE,
    FIRST,
    FORM,
    Api,
    FakeModel,
    api_client,
    completion,
    fake_model,
    tool_call,
    ws_command,
    ws_status,
)
from tests.helpers.suite import Suite
from tests.recorder.helpers import moto_server

pytestmark = pytest.mark.slow

GREETER = "data:text/html," + quote(
    "<title>Greeter</title><input id=name><button id=hi onclick=\"document.getElementById('said')"
    ".textContent = 'hi ' + document.getElementById('name').value\">Hi</button><p id=said></p>"
    "<div style='height: 3000px'></div>")

TICKER = "data:text/html," + quote(
    "<title>Ticker</title><h1 id=c>0</h1><script>let n = 0;"
    "setInterval(() => { document.getElementById('c').textContent = ++n }, 100)</script>")


def script(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    task = body["messages"][1]["content"]
    if "explode" in task:
        return 500, {"error": {"message": "the model is down"}}
    step = sum(1 for m in body["messages"] if m["role"] == "assistant")
    if step == 0:
        return 200, completion([tool_call("c1", "navigate", url=GREETER)], 120)
    if step == 1:
        return 200, completion([tool_call("c2", "type", selector="#name", text="Ana"),
                                tool_call("c3", "click", selector="#hi")], 80)
    if step == 2:
        return 200, completion([tool_call("c4", "scroll", deltaY=500), tool_call("c5", "screenshot"),
                                tool_call("c6", "extract_text", selector="#said")], 60)
    return 200, completion([tool_call("c7", "done", summary="said hi")], 40)


class World:
    suite: Suite
    ana: Api
    bob: Api
    model: FakeModel
    session_id: str
    session: dict[str, Any]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    for tool in ("bwrap", "setpriv", "chromium"):
        if shutil.which(tool) is None:
            pytest.fail(f"infra/system-deps.sh did not install {tool}")
    w = World()
    with moto_server() as s3, fake_model(script) as model:
        w.model = model
        w.suite = Suite(extra_env={
            "DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_BROWSER_HOST": "true",
            "DOVECOTE_TEAM_MAX_CAPSULES": "3",
            "DOVECOTE_MODEL_BASE_URL": model.url, "DOVECOTE_MODEL": "scripted-1",
            "DOVECOTE_MODEL_API_KEY": "sk-test-secret", "DOVECOTE_MODEL_PRICE_PER_1K_TOKENS": "0.5",
            "S3_ENDPOINT_URL": s3, "S3_BUCKET": "browser-artifacts", "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"})
        try:
            w.suite.wait_ready()
            w.ana, w.bob = api_client(w.suite, "Ana"), api_client(w.suite, "Bob")
            yield w
        finally:
            w.suite.stop()
    output = "".join(w.suite.output)
    assert "sk-test-secret" not in output and "?token=" not in output  # secrets are never logged
    assert w.ana.key not in output


def test_create_answers_at_once_then_runs_and_opens_the_initial_url(world: World) -> None:
    started = time.monotonic()
    response = world.ana.post("/api/sessions", {"initialPrompt": FIRST,
                                                "options": {"browser": "chromium",
                                                            "viewport": {"width": 800, "height": 600}}})
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 5
    created = response.json()
    assert set(created) == {"sessionId", "status", "machineId"} and created["status"] == "creating"
    world.session_id = created["sessionId"]
    session = world.ana.wait(world.session_id, lambda s: s["status"] == "running" and s["title"] == "First"
                             and s["navigationHistory"] != [])
    assert session["currentUrl"] == FIRST and session["startedAt"] and session["endedAt"] is None
    assert session["viewport"] == {"width": 800, "height": 600}
    assert [h["status"] for h in session["statusHistory"]] == ["creating", "running"]
    assert session["connectUrl"].startswith("ws://") and "?token=" in session["connectUrl"]
    assert session["navigationHistory"][-1]["url"] == FIRST
    assert session["isolation"].startswith("weaker")
    listed = world.ana.get("/api/sessions").json()
    assert listed["total"] == 1 and listed["hasMore"] is False
    assert listed["sessions"][0]["sessionId"] == world.session_id
    assert listed["sessions"][0]["navigationCount"] >= 1
    world.session = session


def test_playwright_drives_the_browser_through_the_gateway(world: World) -> None:
    with sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(world.session["connectUrl"], timeout=60_000)
        context = browser.contexts[0]
        page = context.new_page()
        page.goto(FORM, timeout=60_000)
        page.fill("#name", "Ana")
        page.click("#go")
        assert page.text_content("#out") == "Hello Ana"
        assert page.title() == "Form"
        page.screenshot()
        browser.close()
    # The action log shows those steps in order, with durations and no cost.
    body = world.ana.get(f"/api/sessions/{world.session_id}/actions").json()
    kinds = [a["type"] for a in body["actions"]]
    assert body["total"] == len(kinds)
    assert kinds[0] == "navigate" and body["actions"][0]["details"]["url"] == FIRST
    after = kinds[1:]
    order = [after.index("navigate"), after.index("type"), after.index("click"), after.index("screenshot")]
    assert order == sorted(order), kinds
    nav = body["actions"][1 + after.index("navigate")]
    assert nav["details"]["url"] == FORM and nav["success"] is True and nav["source"] == "cdp"
    typed = body["actions"][1 + after.index("type")]
    assert typed["details"]["text"] == "Ana"
    for action in body["actions"]:
        assert isinstance(action["duration"], int) and action["duration"] >= 0
        assert action["cost"] == {"tokens": 0, "price": 0.0}
        assert action["timestamp"].endswith("Z")
    page2 = world.ana.get(f"/api/sessions/{world.session_id}/actions",
                          params={"offset": 1, "limit": 2}).json()
    assert page2["total"] == body["total"] and page2["actions"] == body["actions"][1:3]


def test_console_and_network_are_captured(world: World) -> None:
    logs = world.ana.get(f"/api/sessions/{world.session_id}/console").json()["logs"]
    pairs = [(entry["level"], entry["message"]) for entry in logs]
    assert ("log", "page loaded") in pairs and ("error", "bad thing") in pairs, pairs
    assert ("log", "fetched hello") in pairs, pairs
    requests = world.ana.get(f"/api/sessions/{world.session_id}/network").json()["requests"]
    fetched = [r for r in requests if r["url"] == "data:text/plain,hello"]
    assert fetched and fetched[0]["method"] == "GET" and fetched[0]["status"] == 200, requests


def test_artifacts_are_screenshots_with_working_signed_urls(world: World) -> None:
    artifacts = world.ana.get(f"/api/sessions/{world.session_id}/artifacts").json()["artifacts"]
    shots = [a for a in artifacts if a["type"] == "screenshot"]
    assert len(shots) >= 2, artifacts  # at each navigation, and Playwright's
    for shot in shots:
        assert shot["objectId"].startswith("obj-") and shot["timestamp"].endswith("Z")
        downloaded = httpx.get(shot["publicUrl"], timeout=30)
        assert downloaded.status_code == 200 and downloaded.content.startswith(b"\x89PNG\r\n\x1a\n")
    session = world.ana.get(f"/api/sessions/{world.session_id}").json()
    assert session["screenshotCount"] == len(shots) and session["actionCount"] >= 5


def test_health_is_a_real_round_trip(world: World) -> None:
    health = world.ana.get(f"/api/sessions/{world.session_id}/health").json()
    assert health["status"] == "healthy" and health["sessionState"] == "running"
    assert health["browserResponsive"] is True and health["uptimeMs"] > 0
    assert health["currentUrl"]


def test_discovery_documents_and_header_auth(world: World) -> None:
    version = world.ana.get(f"/api/sessions/{world.session_id}/json/version").json()
    assert "Chrome" in version["Browser"] and version["webSocketDebuggerUrl"].startswith("ws://")
    targets = world.ana.get(f"/api/sessions/{world.session_id}/json/list").json()
    assert any(t["type"] == "page" and t["url"] == FIRST for t in targets), targets
    # Playwright with the HTTP endpoint and the x-api-key header: it reads /json/version/.
    endpoint = f"{world.suite.url}{BASE}/{world.session_id}"
    with sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(endpoint, headers={"x-api-key": world.ana.key},
                                              timeout=60_000)
        titles = sorted(page.title() for page in browser.contexts[0].pages)
        assert "First" in titles, titles
        assert browser.contexts[0].pages[0].evaluate("1 + 1") == 2
        browser.close()
    # One page's own WebSocket (from /json/list) speaks CDP without sessions.
    page_ws = next(t for t in targets if t["url"] == FIRST)["webSocketDebuggerUrl"]
    reply = ws_command(page_ws, {"id": 1, "method": "Runtime.evaluate",
                                 "params": {"expression": "document.title", "returnByValue": True}})
    assert reply["result"]["result"]["value"] == "First"


def test_cdp_refuses_without_credentials_and_another_team(world: World) -> None:
    base = world.suite.url.replace("http://", "ws://") + f"{BASE}/{world.session_id}/cdp"
    assert ws_status(base) == 401
    assert ws_status(base + "?token=1.bad") == 401
    assert ws_status(base + "?token=99999999999.forged") == 401
    assert ws_status(base, {"x-api-key": world.bob.key}) == 404
    assert ws_status(base, {"x-api-key": world.ana.key}) == 101
    for path in ("", "/actions", "/artifacts", "/health", "/console", "/network", "/json/version",
                 "/json/list"):
        response = world.bob.get(f"/api/sessions/{world.session_id}{path}")
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "session_not_found"
    assert world.bob.delete(f"/api/sessions/{world.session_id}").status_code == 404
    assert world.bob.get("/api/sessions", params={"includeTerminated": "true"}).json()["total"] == 0


def test_a_session_whose_browser_dies_is_failed_within_seconds(world: World) -> None:
    before = _bwrap_pids()
    session_id = world.ana.create({})
    world.ana.wait_status(session_id, "running")
    new = _bwrap_pids() - before
    assert new
    for pid in new:  # the sandbox's bwrap (and its init in the PID namespace)
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    session = world.ana.wait_status(session_id, "failed", timeout=20)
    assert time.monotonic() - killed < 10
    assert session["error"]["code"] == "browser_exited" and session["endedAt"]
    assert "SIGKILL" in session["error"]["message"], session["error"]  # how it went


def test_an_ai_task_runs_through_the_planner_with_its_cost(world: World) -> None:
    session_id = world.ana.create({"initialPrompt": "Open the greeter and say hi"})
    world.ana.wait(session_id, lambda s: s["status"] != "creating")

    def planned(s: dict[str, Any]) -> bool:
        return s["actionCount"] >= 7 or s["status"] != "running"

    session = world.ana.wait(session_id, planned, timeout=120)
    assert session["status"] == "running", session
    actions = world.ana.get(f"/api/sessions/{session_id}/actions").json()["actions"]
    assert [a["type"] for a in actions] == ["navigate", "type", "click", "scroll", "screenshot",
                                            "extract_text", "done"]
    assert all(a["source"] == "planner" and a["success"] for a in actions), actions
    # A step's tokens are the cost of its first action (the step's total is what the model used).
    assert [a["cost"]["tokens"] for a in actions] == [120, 80, 0, 60, 0, 0, 40]
    assert actions[0]["cost"]["price"] == pytest.approx(0.06)
    assert actions[5]["details"]["result"] == "hi Ana"
    assert session["screenshotCount"] >= 2  # the page load's and the planner's
    assert session["currentUrl"] == GREETER
    assert world.model.auth[0] == "Bearer sk-test-secret"
    sent = world.model.requests[0]
    assert sent["model"] == "scripted-1"
    assert {t["function"]["name"] for t in sent["tools"]} == {
        "navigate", "click", "type", "scroll", "extract_text", "screenshot", "done"}
    # The model saw the tools' results.
    last = world.model.requests[-1]["messages"]
    assert any(m["role"] == "tool" and m["content"] == "hi Ana" for m in last)
    assert world.ana.delete(f"/api/sessions/{session_id}").status_code == 200


def test_a_planner_error_fails_the_session_with_the_reason(world: World) -> None:
    session_id = world.ana.create({"initialPrompt": "please explode now"})
    session = world.ana.wait_status(session_id, "failed")
    assert session["error"]["code"] == "planner_error"
    assert "500" in session["error"]["message"] and "the model is down" in session["error"]["message"]


def test_a_video_session_records_a_webm(world: World) -> None:
    session_id = world.ana.create({"initialPrompt": TICKER, "options": {"recording": "video"}})
    world.ana.wait(session_id, lambda s: s["status"] == "running" and s["title"] == "Ticker")
    time.sleep(3)
    assert world.ana.delete(f"/api/sessions/{session_id}").status_code == 200
    artifacts = world.ana.get(f"/api/sessions/{session_id}/artifacts").json()["artifacts"]
    videos = [a for a in artifacts if a["type"] == "video"]
    assert len(videos) == 1, artifacts
    data = httpx.get(videos[0]["publicUrl"], timeout=30).content
    assert data[:4] == b"\x1a\x45\xdf\xa3"  # EBML: a Matroska/WebM file
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "vp8"
        assert sum(1 for _ in container.decode(stream)) >= 5


def test_team_caps_count_browser_sessions(world: World) -> None:
    extra = []
    response = None
    for _ in range(3):
        response = world.ana.post("/api/sessions", {})
        if response.status_code != 200:
            break
        extra.append(response.json()["sessionId"])
    main = world.ana.get(f"/api/sessions/{world.session_id}").json()
    assert response is not None and response.status_code == 429, (main["status"], main["error"])
    assert response.json()["error"]["code"] == "quota_capsules"
    assert len(extra) == 2  # the first session plus two reach the cap of 3
    for session_id in extra:
        assert world.ana.delete(f"/api/sessions/{session_id}").json() == {
            "success": True, "message": "Session terminated"}
        assert world.ana.get(f"/api/sessions/{session_id}").json()["status"] == "cancelled"


def test_delete_terminates_and_keeps_the_artifacts(world: World) -> None:
    response = world.ana.delete(f"/api/sessions/{world.session_id}")
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Session terminated"}
    session = world.ana.get(f"/api/sessions/{world.session_id}").json()
    assert session["status"] == "cancelled" and session["endedAt"] and session.get("connectUrl") is None
    assert world.ana.get(f"/api/sessions/{world.session_id}/health").json()["browserResponsive"] is False
    artifacts = world.ana.get(f"/api/sessions/{world.session_id}/artifacts").json()["artifacts"]
    recording = [a for a in artifacts if a["type"] == "recording"]
    assert len(recording) == 1
    timeline = httpx.get(recording[0]["publicUrl"], timeout=30).json()
    assert timeline["mode"] == "sparse_timeline" and timeline["navigations"] and timeline["screenshots"]
    logs = world.ana.get(f"/api/sessions/{world.session_id}/console").json()["logs"]
    assert any(entry["message"] == "bad thing" for entry in logs)  # persisted at the end
    assert world.ana.get("/api/sessions").json()["total"] == 0
    everything = world.ana.get("/api/sessions", params={"includeTerminated": "true", "limit": 2}).json()
    assert everything["total"] >= 5 and everything["hasMore"] is True and len(everything["sessions"]) == 2
    # A second DELETE of an ended session still answers the reference's body.
    assert world.ana.delete(f"/api/sessions/{world.session_id}").status_code == 200


def _bwrap_pids() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"bwrap") and b"--remote-debugging-pipe" in argv \
                and b"--hostname" in argv and b"browser" in argv:
            found.add(int(entry))
    return found
