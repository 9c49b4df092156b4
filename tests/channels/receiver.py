"""A local HTTP receiver standing in for Discord, Slack, Telegram, Matrix and webhooks.

It records every request and answers each path from a script (a queue of
replies, then ``200 {"ok": true}``), so a test can make a provider fail a
few times, rate-limit, or hang.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    """One request the receiver got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """What to answer: ``delay_s`` first (a hanging receiver), then status, headers, body."""

    status: int = 200
    body: bytes = b'{"ok": true}'
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def _matches(pattern: str, path: str) -> bool:
    return path == pattern or (pattern.endswith("/") and path.startswith(pattern))


class Receiver:
    """A threaded HTTP server on 127.0.0.1 (use as a context manager)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[Received] = []
        self._scripts: dict[str, list[Reply]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                reply = receiver._record(Received(self.command, path, dict(self.headers.items()),
                                                  body, time.monotonic()))
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_POST = do_PUT = do_GET = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _record(self, request: Received) -> Reply:
        with self._lock:
            self._requests.append(request)
            self._changed.notify_all()
            script = self._scripts.get(request.path)
            if script is None:  # a key ending in "/" scripts every path below it
                script = next((v for k, v in self._scripts.items()
                               if k.endswith("/") and request.path.startswith(k)), None)
            return script.pop(0) if script else Reply()

    def script(self, path: str, *replies: Reply) -> str:
        """Answer the next requests to ``path`` with ``replies``; returns the path's URL."""
        with self._lock:
            self._scripts[path] = list(replies)
        return self.url + path

    def received(self, path: str) -> list[Received]:
        """Requests to ``path`` (or below it, for a path ending in "/"), oldest first."""
        with self._lock:
            return [r for r in self._requests if _matches(path, r.path)]

    def wait_for(self, path: str, count: int, timeout: float = 30.0) -> list[Received]:
        """The first ``count`` requests to ``path``, waiting for them (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                got = [r for r in self._requests if _matches(path, r.path)]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{path}: {len(got)} of {count} requests after {timeout}s")
                self._changed.wait(left)
