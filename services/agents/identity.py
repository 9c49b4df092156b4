"""Who is calling ``/api/agent/*``: the reference's identity headers, plus proof.

The gateway answers a request without ``X-AGH-Session-ID``/``X-AGH-Agent``
itself (401 ``identity_required``); everything else is decided here, in this
order (the token before the state, so a session's state is not told to a
caller without its token):

=============================================  ==================================
situation                                      answer
=============================================  ==================================
no session with that id                        401 ``identity_stale``
no bearer token                                401 ``identity_proof_required``
a token that is not that session's             401 ``identity_proof_invalid``
session not ``active`` (or past its TTL)       401 ``identity_stale``
``X-AGH-Agent`` is not the session's agent     401 ``identity_mismatch``
``X-AGH-Workspace-ID`` is another workspace    403 ``identity_unauthorized``
=============================================  ==================================

A request relayed from a capsule's agent endpoint carries the capsule id
instead of a token (only the gateway's relay sets it, from what vmmgr says
about the channel the request came over): it is answered for the session
bound to that capsule, and a ``X-AGH-Session-ID`` or ``X-AGH-Agent`` naming
another is ``identity_mismatch``.

Session rows are cached for ``agents_identity_cache_s``; the service drops a
session from the cache when it stops it, so a stopped session is refused at
once (one agents process; see :mod:`.core`).
"""

from __future__ import annotations

import hmac
from typing import Any

from dovecote.bus.messages.agents import AgentIdentity
from dovecote.services.agents.core import Agents, epoch
from dovecote.services.agents.errors import IdentityError

_COLUMNS = (
    "SELECT id, team_id, workspace_id, agent_name, name, channel, provider, model, state, type, "
    "token_hash, capabilities, root_session_id, parent_session_id, spawn_depth, spawn_role, "
    "permission_policy, spawn_budget, auto_stop_on_parent, ttl_seconds, ttl_expires_at, stop_reason, "
    "stop_detail, created_at, updated_at, capsule_id FROM sessions"
)


class Identity:
    """Resolves agent identities to session rows (dicts of the ``sessions`` table)."""

    def __init__(self, agents: Agents) -> None:
        self.agents = agents
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}

    def forget(self, *session_ids: str) -> None:
        for sid in session_ids:
            self._cache.pop(sid, None)

    async def _row(self, session_id: str) -> dict[str, Any] | None:
        now = self.agents.clock()
        hit = self._cache.get(session_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        row = await self.agents.db.fetchone(_COLUMNS + " WHERE id = %s", (session_id,))
        if row is not None and self.agents.config.agents_identity_cache_s > 0:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[session_id] = (now + self.agents.config.agents_identity_cache_s, row)
        return row

    async def resolve(self, ident: AgentIdentity) -> dict[str, Any]:
        """The caller's session row, or raise IdentityError."""
        if ident.capsule_id:
            return await self._resolve_capsule(ident)
        row = await self._row(ident.session_id) if len(ident.session_id) <= 64 else None
        if row is None:
            raise IdentityError(
                "unknown agent session", code="identity_stale", details={"session_id": ident.session_id}
            )
        if not ident.token_sha256:
            raise IdentityError(
                "Authorization: Bearer <agent token> is required", code="identity_proof_required"
            )
        try:
            proof = bytes.fromhex(ident.token_sha256)
        except ValueError:
            proof = b""
        if not hmac.compare_digest(proof, bytes(row["token_hash"])):
            raise IdentityError(
                "the bearer token is not this session's agent token", code="identity_proof_invalid"
            )
        expires = epoch(row["ttl_expires_at"])
        if row["state"] != "active" or (expires is not None and expires <= self.agents.clock()):
            raise IdentityError(
                f"the agent session is {row['state']}", code="identity_stale", details={"state": row["state"]}
            )
        if ident.agent_name != row["agent_name"]:
            raise IdentityError("X-AGH-Agent does not match the session's agent", code="identity_mismatch")
        if ident.workspace_id and ident.workspace_id != row["workspace_id"]:
            raise IdentityError(
                "the session does not belong to that workspace", code="identity_unauthorized", status=403
            )
        return row

    async def _resolve_capsule(self, ident: AgentIdentity) -> dict[str, Any]:
        row = await self.agents.db.fetchone(_COLUMNS + " WHERE capsule_id = %s", (ident.capsule_id,))
        if row is None:
            raise IdentityError("no agent session is bound to this capsule", code="identity_stale")
        if (ident.session_id and ident.session_id != row["id"]) or (
            ident.agent_name and ident.agent_name != row["agent_name"]
        ):
            raise IdentityError(
                "this capsule speaks for its own agent session only", code="identity_mismatch"
            )
        expires = epoch(row["ttl_expires_at"])
        if row["state"] != "active" or (expires is not None and expires <= self.agents.clock()):
            raise IdentityError(
                f"the agent session is {row['state']}", code="identity_stale", details={"state": row["state"]}
            )
        if ident.workspace_id and ident.workspace_id != row["workspace_id"]:
            raise IdentityError(
                "the session does not belong to that workspace", code="identity_unauthorized", status=403
            )
        return row
