"""Live sessions on the xvfb provider, driven by a local OpenAI-compatible test double.

The test starts a tiny chat-completions server that answers with tool calls:
first a ``computer`` type_text and an ``ask_confirmation``, then ``done``. The
live session routes the instruction to the planner, types on the real
desktop, waits on the confirmation (a second instruction meanwhile is 409),
and finishes after ``confirm``. The screen stream feeds two readers while a
third never reads.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.suite import Suite
from tests.runs.helpers import TOOLS, Api, api_client

pytestmark = pytest.mark.slow


class FakeModel(BaseHTTPRequestHandler):
    calls: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        self._send({"data": [{"id": "fake-model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeModel.calls.append(body)
        tools_done = sum(1 for m in body["messages"] if m["role"] == "tool")
        if tools_done == 0:
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {
                    "name": "computer", "arguments": json.dumps({"action": "type_text", "text": "hi"})}},
                {"id": "c2", "type": "function", "function": {
                    "name": "ask_confirmation", "arguments": json.dumps({"message": "Save the file?"})}}]}
        else:
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c3", "type": "function", "function": {
                    "name": "done", "arguments": json.dumps({"summary": "typed and confirmed"})}}]}
        self._send({"choices": [{"message": message}], "usage": {"total_tokens": 10}})

    def _send(self, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class World:
    suite: Suite
    ana: Api
    bob: Api
    session: dict[str, Any]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"infra/system-deps.sh did not install {missing}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = Path(tempfile.mkdtemp(prefix="dclive-", dir="/var/tmp"))
    root.chmod(0o755)
    w = World()
    w.suite = Suite(extra_env={
        "DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_DESKTOP_XVFB": "true",
        "DOVECOTE_DESKTOP_XVFB_ROOT": str(root / "runtime"), "DOVECOTE_RUNS_DESKTOP_PROVIDER": "xvfb",
        "DOVECOTE_MODEL_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}/v1",
        "DOVECOTE_MODEL": "fake-model", "DOVECOTE_MODEL_API_KEY": "sk-test-secret"})
    try:
        w.suite.wait_ready()
        w.ana, w.bob = api_client(w.suite, "Ana"), api_client(w.suite, "Bob")
        yield w
    finally:
        w.suite.stop()
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def wait_for(api: Api, session_id: str, status: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        session: dict[str, Any] = api.get(f"/api/live-sessions/{session_id}").json()["session"]
        if session["status"] == status:
            return session
        time.sleep(0.2)
    raise AssertionError(f"{session_id} never reached {status}: {session}")


def test_instruction_routes_acts_waits_for_confirmation_and_finishes(world: World) -> None:
    created = world.ana.post("/api/live-sessions", {"model": "fake-model", "authProvider": "api-key"})
    assert created.status_code == 201, created.text
    session = created.json()
    world.session = session
    for key in ("id", "createdAt", "updatedAt", "model", "authProvider", "agentType", "agentConfig", "status",
                "artifactDir", "latestScreenshotUrl", "latestInstruction", "latestSummary", "stopRequested",
                "error", "pendingConfirmation"):
        assert key in session, key
    wait_for(world.ana, session["id"], "idle")
    sid = session["id"]
    assert world.ana.post(f"/api/live-sessions/{sid}/commands", {}).status_code == 400
    assert world.ana.post(f"/api/live-sessions/{sid}/confirm", {"choice": "confirmed"}).json() == {
        "error": "No pending confirmation."}
    sent = world.ana.post(f"/api/live-sessions/{sid}/commands", {"instruction": "Type hi and save"})
    assert sent.status_code == 202, sent.text
    waiting = wait_for(world.ana, sid, "waiting_confirmation")
    assert waiting["pendingConfirmation"]["message"] == "Save the file?"
    again = world.ana.post(f"/api/live-sessions/{sid}/commands", {"instruction": "something else"})
    assert again.status_code == 409, again.text
    assert world.bob.post(f"/api/live-sessions/{sid}/confirm", {"choice": "confirmed"}).status_code == 404
    confirmed = world.ana.post(f"/api/live-sessions/{sid}/confirm", {"choice": "confirmed"})
    assert confirmed.status_code == 200, confirmed.text
    done = wait_for(world.ana, sid, "idle")
    assert done["latestSummary"] == "typed and confirmed" and done["pendingConfirmation"] is None
    events = world.ana.get(f"/api/live-sessions/{sid}").json()["events"]
    route = next(e for e in events if e["type"] == "agent_route")
    assert route["payload"]["agentType"] == "planner" and route["sessionId"] == sid
    actions = [e for e in events if e["type"] == "computer_action"]
    assert actions and actions[0]["payload"]["action"] == {"kind": "type_text", "text": "hi"}
    assert any(e["type"] == "tool_result" and e["payload"].get("receipt", {}).get("status") == "ok"
               for e in events)
    assert len(FakeModel.calls) == 2 and FakeModel.calls[0]["model"] == "fake-model"
    assert "sk-test-secret" not in "\n".join(world.suite.output)
    observed = world.ana.post(f"/api/live-sessions/{sid}/observe")
    assert observed.status_code == 200, observed.text
    shot = observed.json()["screenshot"]
    assert shot["width"] == 1024 and shot["height"] == 768 and shot["url"]
    assert world.bob.get(f"/api/live-sessions/{sid}").status_code == 404
    history = world.ana.get("/api/history").json()
    assert history["total"] >= 1 and history["items"][0]["id"] == sid and history["items"][0]["hasToolEvents"]


def read_frames(world: World, sid: str, count: int, out: list[float]) -> None:
    with httpx.Client(base_url=world.suite.url, headers={"X-API-Key": world.ana.key}, timeout=30) as http:
        with http.stream("GET", f"/api/live-sessions/{sid}/screen-stream") as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    frame = json.loads(line[6:])
                    assert frame["width"] == 1024 and frame["image"].startswith("/9j/")  # JPEG
                    out.append(time.monotonic())
                    if len(out) >= count:
                        return


def test_screen_stream_feeds_two_readers_while_a_stalled_one_is_dropped(world: World) -> None:
    sid = world.session["id"]
    stalled = socket.create_connection(("127.0.0.1", world.suite.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(f"GET /api/live-sessions/{sid}/screen-stream HTTP/1.1\r\nHost: x\r\n"
                    f"X-API-Key: {world.ana.key}\r\n\r\n".encode())
    try:
        time.sleep(1)
        a: list[float] = []
        b: list[float] = []
        started = time.monotonic()
        threads = [threading.Thread(target=read_frames, args=(world, sid, 8, out)) for out in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(a) == 8 and len(b) == 8
        assert time.monotonic() - started < 15  # about 2 frames a second, not held back by the stalled one
    finally:
        stalled.close()
