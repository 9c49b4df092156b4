"""The agent endpoint: the agent runtime's API served to code in a capsule bound to an agent session.

Code in the capsule calls ``http://127.0.0.1:7070/api/agent/...`` (the URL is
``AGH_AGENT_URL`` in its environment, with ``AGH_SESSION_ID`` and
``AGH_AGENT``, set by the host) with no secret. Each request is queued here;
the host pulls it with ``TakeRelay`` over this agent's own channel, has it
answered by the agent runtime as the session the capsule is bound to, and
gives the answer back with ``AnswerRelay``. The capsule is the credential:
whatever the request says, it is answered for the bound session only (the
host decides that; nothing here can name another).

The endpoint listens on the guest's loopback only, from the host's first
``TakeRelay`` on (a capsule that is not bound never listens). It speaks
enough HTTP/1.1 for API clients (``curl``, ``requests``, ``httpx``): a
request line, headers, a ``Content-Length`` body (no chunked uploads), one
request per connection (the answer closes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

from .. import protocol as P

log = logging.getLogger("dovecote-agent")

MAX_BODY = 4 * 1024 * 1024
MAX_HEAD = 64 * 1024
ANSWER_TIMEOUT_S = 120.0
"""How long a caller waits for the host's answer before it gets 504."""
QUEUE_LIMIT = 256

REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           413: "Payload Too Large", 422: "Unprocessable Entity", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


class AgentEndpoint:
    """The loopback HTTP server and the queue of its requests the host has not taken yet."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[P.RelayedRequest] = asyncio.Queue(QUEUE_LIMIT)
        self.waiting: dict[int, asyncio.Future[P.AnswerRelay]] = {}
        self.numbers = itertools.count(1)
        self.server: asyncio.base_events.Server | None = None
        self._starting = asyncio.Lock()

    async def take(self, req: P.TakeRelay) -> P.RelayTaken:
        """The next request of code in the guest, waiting at most ``wait_s`` (starts the server)."""
        await self._start(req.port)
        try:
            relayed = await asyncio.wait_for(self.queue.get(), timeout=max(0.0, min(req.wait_s, 60.0)))
        except TimeoutError:
            return P.RelayTaken(id=req.id)
        return P.RelayTaken(id=req.id, request=relayed)

    def answer(self, req: P.AnswerRelay) -> P.Done:
        future = self.waiting.get(req.no)
        if future is not None and not future.done():
            future.set_result(req)
        return P.Done(id=req.id)

    async def _start(self, port: int) -> None:
        async with self._starting:
            if self.server is None:
                self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
                log.info("agent endpoint listening on 127.0.0.1:%d", port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, content_type, body = await self._one(reader)
        except Exception as exc:  # a broken client: answer if we still can
            log.warning("agent endpoint request failed: %s", exc)
            status, content_type, body = 400, "application/json", b'{"error":"bad request"}'
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
            writer.close()

    async def _one(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        if len(head) > MAX_HEAD:
            return 413, "application/json", b'{"error":"headers too large"}'
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return 400, "application/json", b'{"error":"send a Content-Length body"}'
        length = int(headers.get("content-length", "0") or 0)
        if not 0 <= length <= MAX_BODY:
            return 413, "application/json", b'{"error":"body too large"}'
        body = await asyncio.wait_for(reader.readexactly(length), timeout=30) if length else b""
        no = next(self.numbers)
        future: asyncio.Future[P.AnswerRelay] = asyncio.get_running_loop().create_future()
        self.waiting[no] = future
        try:
            try:
                self.queue.put_nowait(P.RelayedRequest(no=no, method=method, path=path,
                                                       headers=headers, body=body))
            except asyncio.QueueFull:
                return 503, "application/json", b'{"error":"the agent endpoint is busy"}'
            try:
                answer = await asyncio.wait_for(future, timeout=ANSWER_TIMEOUT_S)
            except TimeoutError:
                return 504, "application/json", b'{"error":"the agent runtime did not answer"}'
            return answer.status, answer.content_type, answer.body
        finally:
            self.waiting.pop(no, None)
