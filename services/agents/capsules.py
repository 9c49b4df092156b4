"""Capsule-bound agent sessions: the capsule is the session's credential, and ends with it.

A session created with ``capsule_template`` gets a new capsule of that
template (``CreateCapsule`` to vmmgr, as the operator who created the
session), recorded on its row (``capsule_id``, ``capsule_host``), then bound
(:class:`~dovecote.bus.messages.agents.BindAgentCapsule` to that host's vmmgr):
vmmgr sets ``AGH_SESSION_ID``, ``AGH_AGENT`` and ``AGH_AGENT_URL`` in the
capsule's environment and relays its agent endpoint's requests to the gateway,
which asks this service with an identity that carries only the capsule id
(:meth:`.identity.Identity.resolve` answers for the bound session, and only
for it). A spawned child is bound the same way (as its team) when an entry
of its ``sandbox_profiles`` names a template the team may use (the first such
entry). If the capsule cannot be made or bound, the session is not created,
or the child is stopped (and a capsule made is destroyed). Stopping the
session (by an operator, its parent, or its TTL) destroys its capsule.

vmmgr keeps its relay tasks in memory, so :meth:`SessionCapsules.serve_rebind`
binds every active session's capsule again every :data:`REBIND_EVERY_S`
(a bind of a bound capsule only sets its environment again): a restarted
vmmgr serves the endpoints again within that time.
"""

from __future__ import annotations

from typing import Any

import trio

from dovecote.bus.messages import agents as m
from dovecote.bus.messages import capsules as c
from dovecote.bus.messages.common import Principal
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.agents.capsules")

CREATE_TIMEOUT_S = 120.0
BIND_TIMEOUT_S = 180.0
"""vmmgr waits for the new capsule to run before it answers the bind."""
DESTROY_TIMEOUT_S = 60.0
REBIND_EVERY_S = 30.0
REBIND_TIMEOUT_S = 20.0


def team_principal(team_id: str) -> Principal:
    """Who the service is when it ends a session's capsule: a caller of that team."""
    return Principal(auth_type="service", team_id=team_id, name="agents")


class SessionCapsules:
    """Creates, binds and destroys the capsules of capsule-bound sessions."""

    def __init__(self, request: Any) -> None:
        self.request = request

    async def serve_rebind(self, db: Any) -> None:
        """Bind the capsules of active sessions again, every :data:`REBIND_EVERY_S`, forever."""
        while True:
            await trio.sleep(REBIND_EVERY_S)
            try:
                rows = await db.fetchall(
                    "SELECT id, team_id, agent_name, capsule_id, capsule_host FROM sessions "
                    "WHERE capsule_id IS NOT NULL AND state = 'active' ORDER BY id LIMIT 1000"
                )
            except Exception as exc:
                log.warning("could not list the capsule-bound sessions", extra={"error": repr(exc)})
                continue
            for r in rows:
                with trio.move_on_after(REBIND_TIMEOUT_S):
                    try:
                        await self.request(
                            f"vmmgr.{r['capsule_host']}",
                            m.BindAgentCapsule(
                                actor=team_principal(r["team_id"]),
                                capsule_id=r["capsule_id"],
                                session_id=r["id"],
                                agent_name=r["agent_name"],
                                wait_s=REBIND_TIMEOUT_S / 2,
                            ),
                            timeout=REBIND_TIMEOUT_S,
                        )
                    except Exception as exc:
                        log.info(
                            "capsule not bound again",
                            extra={"capsule_id": r["capsule_id"], "error": repr(exc)},
                        )

    async def create(self, actor: Principal, template: str, session_id: str) -> tuple[str, str]:
        """A new capsule of ``template`` for the session: (capsule id, host id)."""
        if not template or len(template) > 100 or not template.isprintable():
            raise ServiceError(400, "invalid_request", "capsule_template must be a template name")
        spec = c.CapsuleSpec(template=template, metadata={"agent_session": session_id})
        reply = await self.request("vmmgr", c.CreateCapsule(actor=actor, spec=spec), timeout=CREATE_TIMEOUT_S)
        return reply.capsule.id, reply.host_id

    async def template_named(self, team_id: str, profiles: list[str]) -> str | None:
        """The first of ``profiles`` that names a template the team may use, or None."""
        reply = await self.request("vmmgr", c.ListTemplates(actor=team_principal(team_id)), timeout=30)
        names = {t.name for t in reply.templates}
        return next((p for p in profiles if p in names), None)

    async def bind(
        self, actor: Principal, capsule_id: str, host_id: str, session_id: str, agent_name: str
    ) -> None:
        await self.request(
            f"vmmgr.{host_id}",
            m.BindAgentCapsule(
                actor=actor, capsule_id=capsule_id, session_id=session_id, agent_name=agent_name
            ),
            timeout=BIND_TIMEOUT_S,
        )

    async def destroy(self, team_id: str, capsule_id: str, host_id: str) -> None:
        """Destroy the capsule (already gone is fine); failures are logged, never raised."""
        try:
            await self.request(
                f"vmmgr.{host_id}",
                c.DestroyCapsule(actor=team_principal(team_id), capsule_id=capsule_id),
                timeout=DESTROY_TIMEOUT_S,
            )
        except ServiceError as exc:
            if exc.status != 404:
                log.warning(
                    "could not destroy a session's capsule",
                    extra={"capsule_id": capsule_id, "error": repr(exc)},
                )
        except Exception as exc:
            log.warning(
                "could not destroy a session's capsule", extra={"capsule_id": capsule_id, "error": repr(exc)}
            )
