"""The gateway's half of a capsule's agent endpoint: relayed requests run through the app.

Code in a capsule bound to an agent session calls ``/api/agent/*`` on its
loopback endpoint; vmmgr pulls each request over the capsule's own agent
channel and sends it here as a
:class:`~dovecote.bus.messages.agents.RelayAgentRequest` naming the capsule.
It runs through this gateway's own app (in process, as an ASGI call), so it
meets exactly the routes, validation and error shapes an HTTP caller meets;
the one difference is the ASGI scope key
:data:`~dovecote.gateway.routes.agents.RELAYED_CAPSULE`, which HTTP cannot
set: the route's identity is then the capsule (no token), and the agents
service answers for the session bound to it only.
"""

from __future__ import annotations

from typing import Any

import trio

from dovecote.bus.messages.agents import RelayAgentReply, RelayAgentRequest
from dovecote.gateway.routes.agents import RELAYED_CAPSULE

PREFIX = "/api/agent/"
TIMEOUT_S = 90.0


class AgentRelay:
    """Answers :class:`RelayAgentRequest` with the app's answer to it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def register(self, handle: Any) -> None:
        handle(RelayAgentRequest, self.handle)

    async def handle(self, msg: RelayAgentRequest) -> RelayAgentReply:
        path, _, query = msg.path.partition("?")
        if not path.startswith(PREFIX) or len(msg.path) > 4096 or not msg.path.isprintable():
            return RelayAgentReply(status=404, body=b'{"error":"the endpoint serves /api/agent/* only"}')
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in msg.headers.items()
                   if k.lower() not in ("authorization", "content-length", "host", "transfer-encoding")]
        headers += [(b"host", b"agent-endpoint"), (b"content-length", str(len(msg.body)).encode())]
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": msg.method.upper()[:16], "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": query.encode(), "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 0), "server": ("agent-endpoint", 80), "extensions": {},
            RELAYED_CAPSULE: msg.capsule_id,
        }
        sent = False
        done = trio.Event()
        status = 500
        content_type = "application/json"
        body = bytearray()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": msg.body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(event: dict[str, Any]) -> None:
            nonlocal status, content_type
            if event["type"] == "http.response.start":
                status = int(event["status"])
                for key, value in event.get("headers", []):
                    if key.lower() == b"content-type":
                        content_type = value.decode("latin-1")
            elif event["type"] == "http.response.body":
                body.extend(event.get("body", b""))
                if not event.get("more_body", False):
                    done.set()

        with trio.move_on_after(TIMEOUT_S):
            await self.app(scope, receive, send)
        if not done.is_set():
            return RelayAgentReply(status=504, body=b'{"error":"the agent runtime did not answer in time"}')
        return RelayAgentReply(status=status, content_type=content_type, body=bytes(body))
