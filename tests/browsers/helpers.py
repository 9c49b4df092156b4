"""Test helpers of browser sessions: API clients, waits, a scripted OpenAI-compatible model server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import httpx
import trio
import trio_websocket

from tests.accounts.helpers import signed_up_user
from tests.helpers.suite import Suite

BASE = "/browser/api/sessions"


class Api:
    def __init__(self, suite: Suite, key: str) -> None:
        self.key = key
        self.http = httpx.Client(base_url=suite.url + "/browser", timeout=60, headers={"x-api-key": key})

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, **kw)

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return self.http.post(path, json=body)

    def delete(self, path: str) -> httpx.Response:
        return self.http.delete(path)

    def create(self, body: dict[str, Any]) -> str:
        response = self.post("/api/sessions", body)
        assert response.status_code == 200, response.text
        created = response.json()
        assert created["status"] == "creating" and created["machineId"], created
        session_id: str = created["sessionId"]
        return session_id

    def wait(self, session_id: str, predicate: Callable[[dict[str, Any]], bool],
             timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            response = self.get(f"/api/sessions/{session_id}")
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if predicate(body):
                return body
            assert body["status"] not in ("completed", "failed", "cancelled"), f"session ended: {body}"
            assert time.monotonic() < deadline, f"session never got there: {body}"
            time.sleep(0.3)

    def wait_status(self, session_id: str, *statuses: str, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body: dict[str, Any] = self.get(f"/api/sessions/{session_id}").json()
            if body["status"] in statuses:
                return body
            assert time.monotonic() < deadline, f"session never got there: {body}"
            time.sleep(0.3)


def ws_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status a WebSocket handshake gets (101 when it is accepted)."""

    async def attempt() -> int:
        try:
            async with trio_websocket.open_websocket_url(url, extra_headers=list((headers or {}).items())):
                return 101
        except trio_websocket.ConnectionRejected as exc:
            return int(exc.status_code or 0)

    with_timeout: int = trio.run(_timed, attempt)
    return with_timeout


def ws_command(url: str, message: dict[str, Any]) -> dict[str, Any]:
    """Send one CDP command over a WebSocket; its reply."""

    async def exchange() -> dict[str, Any]:
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(json.dumps(message))
            while True:
                reply: dict[str, Any] = json.loads(await ws.get_message())
                if reply.get("id") == message["id"]:
                    return reply

    result: dict[str, Any] = trio.run(_timed, exchange)
    return result


async def _timed(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(60):
        return await fn()


def api_client(suite: Suite, name: str) -> Api:
    browser, _, _ = signed_up_user(suite, name)
    response = browser.post("/v1/api-keys", {"name": f"{name}'s key"})
    assert response.status_code == 201, response.text
    return Api(suite, response.json()["key"])


class FakeModel:
    """A scripted chat-completions endpoint: ``script(request_body) -> (status, body)``."""

    def __init__(self, script: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.url = ""


@contextmanager
def fake_model(script: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]) -> Iterator[FakeModel]:
    model = FakeModel(script)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            model.requests.append(body)
            model.auth.append(self.headers.get("Authorization", ""))
            status, answer = (404, {"error": "not found"}) if self.path != "/v1/chat/completions" \
                else model.script(body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    model.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield model
    finally:
        server.shutdown()
        server.server_close()


def tool_call(call_id: str, name: str, **arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def completion(calls: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    return {"id": "chatcmpl-test", "object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": None, "tool_calls": calls}}],
        "usage": {"prompt_tokens": tokens - 10, "completion_tokens": 10, "total_tokens": tokens}}


FIRST = "data:text/html," + quote(
    "<title>First</title><script>console.log('page loaded'); console.error('bad thing');"
    "fetch('data:text/plain,hello').then(r => r.text()).then(t => console.log('fetched ' + t));"
    "</script><h1>first</h1>")
"""A page that logs, errors and fetches (console and network logs)."""
FORM = "data:text/html," + quote(
    "<title>Form</title><form onsubmit=\"event.preventDefault(); document.getElementById('out')"
    ".textContent = 'Hello ' + document.getElementById('name').value\"><input id=name>"
    "<button id=go>Go</button></form><div id=out></div>")
"""A form whose submit writes a greeting (Playwright fills and clicks it)."""
