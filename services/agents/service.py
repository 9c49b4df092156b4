"""The agents service: the agent runtime Dovecote serves (``dovecote agents`` runs :data:`SPEC`).

It owns the ``agents`` schema (``migrations/0010_agents.sql``): workspaces
and coordinator settings, agent sessions with lineage and budgets,
coordination channels and their messages, tasks, runs and their leases,
souls, and an audit log of every state change. The gateway asks it with the
messages of :mod:`dovecote.bus.messages.agents`: agents through
``/api/agent/*`` (each request carries its identity, checked by
:mod:`.identity`), operators through ``/v1/agent/*``.

Background tasks, all in the service nursery: the lease sweeper and the
session TTL sweeper (every ``DOVECOTE_AGENTS_SWEEP_EVERY_S``), the ordered
lifecycle event sender (:mod:`.events`), and the rebinding of capsule-bound
sessions' capsules (:mod:`.capsules`), and the group commit of the hot
lease statements (:mod:`.batch`).

Module map: pure cores :mod:`.lease`, :mod:`.lineage`, :mod:`.context`,
:mod:`.soul`; one module per table group for the rest (:mod:`.workspaces`,
:mod:`.sessions`, :mod:`.tasks`, :mod:`.channels`, :mod:`.souls`,
:mod:`.selfview`); refusals are :mod:`.errors`.
"""

from __future__ import annotations

import trio

from dovecote.libs.runtime import ServiceContext, ServiceSpec
from dovecote.services.agents.capsules import SessionCapsules
from dovecote.services.agents.channels import Channels
from dovecote.services.agents.core import Agents, AgentsConfig
from dovecote.services.agents.events import EventQueue
from dovecote.services.agents.identity import Identity
from dovecote.services.agents.selfview import SelfViews
from dovecote.services.agents.sessions import Sessions
from dovecote.services.agents.souls import Souls
from dovecote.services.agents.tasks import Tasks
from dovecote.services.agents.workspaces import Workspaces


async def main(
    ctx: ServiceContext[AgentsConfig], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Register the handlers, start the sweepers and the event sender, serve until stopped."""
    assert ctx.db is not None
    events = EventQueue(ctx.bus.request, ctx.config.agents_event_queue)
    agents = Agents(ctx.db, ctx.config, events)
    identity = Identity(agents)
    workspaces = Workspaces(agents, identity)
    capsules = SessionCapsules(ctx.bus.request)
    sessions = Sessions(agents, identity, capsules)
    tasks = Tasks(agents, identity)
    channels = Channels(agents, identity)
    souls = Souls(agents, identity)
    for part in (
        workspaces,
        sessions,
        tasks,
        channels,
        souls,
        SelfViews(agents, identity, workspaces, channels, souls),
    ):
        part.register(ctx.handle)
    await ctx.nursery.start(events.serve)
    await ctx.nursery.start(agents.group.serve)
    ctx.nursery.start_soon(tasks.serve_sweeper, ctx.config.agents_sweep_every_s)
    ctx.nursery.start_soon(sessions.serve_ttl, ctx.config.agents_sweep_every_s)
    ctx.nursery.start_soon(capsules.serve_rebind, ctx.db)
    task_status.started()
    await ctx.stopping.wait()


SPEC: ServiceSpec[AgentsConfig] = ServiceSpec(
    name="agents",
    config_cls=AgentsConfig,
    main=main,
    schema="agents",
    migrations="dovecote.services.agents:migrations",
)
