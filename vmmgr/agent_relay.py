"""The agent endpoint of capsules bound to agent sessions: vmmgr's half of the relay.

The agents service binds a capsule it made for an agent session
(:class:`~dovecote.bus.messages.agents.BindAgentCapsule`). Here, once the
capsule runs and its guest agent answers: the capsule's later processes get
``AGH_SESSION_ID``, ``AGH_AGENT`` and ``AGH_AGENT_URL`` in their environment
(``SetIdentity``), and one task per bound capsule pulls the requests code in
the capsule made to its agent endpoint (``TakeRelay`` over the capsule's own
agent channel, which is how this side knows which capsule asked) and has
each answered by a gateway (:class:`~dovecote.bus.messages.agents.RelayAgentRequest`,
naming the capsule), then hands the answer back (``AnswerRelay``). The task
ends when the capsule is gone (destroyed with its session).
"""

from __future__ import annotations

from typing import Any

import trio

from dovecote.bus.messages import agents as am
from dovecote.bus.messages import capsules as cm
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.agent_ops import AgentOps
from dovecote.vmmgr.guest import errors as ge
from dovecote.vmmgr.guest.protocol import RelayedRequest

log = get_logger("dovecote.vmmgr.agent_relay")

PORT = 7070
ENDPOINT = f"http://127.0.0.1:{PORT}"
BIND_WAIT_S = 170.0
"""How long a bind waits for a new capsule to run and its agent to answer."""
TAKE_WAIT_S = 20.0
ANSWER_TIMEOUT_S = 100.0
PASSED_HEADERS = ("content-type", "accept", "x-agh-session-id", "x-agh-agent", "x-agh-workspace-id",
                  "idempotency-key")
"""What of a relayed request's headers the gateway sees (never an Authorization header)."""


class AgentRelays:
    """One relay task per bound capsule of this host, in ``nursery``."""

    def __init__(self, *, ops: AgentOps, request: Any, nursery: trio.Nursery) -> None:
        self.ops = ops
        self.request = request
        self.nursery = nursery
        self.relaying: set[str] = set()

    def register(self, handle: Any) -> None:
        handle(am.BindAgentCapsule, self.bind)

    async def bind(self, msg: am.BindAgentCapsule) -> am.AgentCapsuleBound:
        op = cm.PingCapsule(actor=msg.actor, capsule_id=msg.capsule_id)
        with trio.move_on_after(max(0.0, min(msg.wait_s, BIND_WAIT_S))) as waited:
            while True:
                try:
                    _, client = await self.ops.agent_of(op)
                    await client.ping()
                    break
                except ServiceError as exc:
                    if exc.status not in (409, 502, 504):
                        raise
                except ge.AgentError:
                    pass
                await trio.sleep(0.5)
        if waited.cancelled_caught:
            raise ServiceError(504, "capsule_not_ready", "the session's capsule did not come up in time")
        await client.set_identity(env={"AGH_SESSION_ID": msg.session_id, "AGH_AGENT": msg.agent_name,
                                       "AGH_AGENT_URL": ENDPOINT})
        if msg.capsule_id not in self.relaying:
            self.relaying.add(msg.capsule_id)
            self.nursery.start_soon(self._relay, op)
        log.info("agent endpoint bound", extra={"capsule_id": msg.capsule_id, "session_id": msg.session_id})
        return am.AgentCapsuleBound(endpoint=ENDPOINT)

    async def _relay(self, op: cm.PingCapsule) -> None:
        try:
            async with trio.open_nursery() as answers:
                while True:
                    try:
                        _, client = await self.ops.agent_of(op)
                        req = await client.take_relay(wait_s=TAKE_WAIT_S, port=PORT)
                    except ServiceError as exc:
                        if exc.status == 404 or (exc.status == 409 and await self._gone(op)):
                            log.info("agent endpoint unbound: capsule gone",
                                     extra={"capsule_id": op.capsule_id})
                            answers.cancel_scope.cancel()
                            return
                        await trio.sleep(1.0)
                        continue
                    except ge.AgentError:
                        await trio.sleep(1.0)
                        continue
                    if req is not None:
                        answers.start_soon(self._answer, client, op.capsule_id, req)
        except Exception:
            log.warning("agent endpoint relay failed", exc_info=True, extra={"capsule_id": op.capsule_id})
        finally:
            self.relaying.discard(op.capsule_id)

    async def _gone(self, op: cm.PingCapsule) -> bool:
        try:
            row = await self.ops.capsule_of(op)
        except ServiceError:
            return True
        return str(row["status"]) in ("stopping", "stopped", "missing", "error")

    async def _answer(self, client: Any, capsule_id: str, req: RelayedRequest) -> None:
        headers = {k: v for k, v in req.headers.items() if k in PASSED_HEADERS}
        try:
            reply = await self.request(
                "gateway",
                am.RelayAgentRequest(capsule_id=capsule_id, method=req.method, path=req.path,
                                     headers=headers, body=req.body),
                timeout=ANSWER_TIMEOUT_S,
            )
            status, content_type, body = reply.status, reply.content_type, reply.body
        except Exception as exc:
            log.warning("agent endpoint request not relayed", extra={"capsule_id": capsule_id,
                                                                     "error": repr(exc)})
            status, content_type = 503, "application/json"
            body = b'{"error":"the agent runtime is unavailable; retry shortly"}'
        try:
            await client.answer_relay(req.no, status, body, content_type=content_type)
        except ge.AgentError as exc:
            log.warning("agent endpoint answer lost", extra={"capsule_id": capsule_id, "error": repr(exc)})
