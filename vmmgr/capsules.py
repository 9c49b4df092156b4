"""Capsules: the facade the rest of vmmgr uses, and the bus handlers of capsule messages.

One :class:`Capsules` per vmmgr process answers the capsule messages of
:mod:`dovecote.bus.messages.capsules`. It is made of four parts, one concern
each:

- :mod:`~dovecote.vmmgr.capsule_store`: the ``capsules`` table, the only
  module that speaks SQL to it; its :class:`~dovecote.vmmgr.capsule_store.Status`
  enum and guarded status changes;
- :mod:`~dovecote.vmmgr.lifecycle`: create (placement, forwarding), boot,
  destroy, and the entry points reconcile and hostlink use;
- :mod:`~dovecote.vmmgr.agent_ops`: the operations through the guest agent
  (exec, processes, files) and its connections;
- :mod:`~dovecote.vmmgr.capsule_events`: the ``capsule.state`` events and the
  lifecycle events for the notifier's log.

The state of record is the ``capsules`` table; the VM is whatever the driver
runs (libvirt owns it, so a crash of vmmgr leaves it running, see
:mod:`dovecote.vmmgr.reconcile`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dovecote.bus.messages import capsules as m
from dovecote.libs.db import Database
from dovecote.vmmgr.agent_ops import AgentOps, AgentPool, agent_errors, check_path
from dovecote.vmmgr.capsule_events import EventRecorder, Publish, Request, event_actor
from dovecote.vmmgr.capsule_store import (
    FINAL_STATUSES,
    NOT_FOUND,
    ON_HOST,
    CapsuleStore,
    Row,
    Status,
    reply_of,
    require_local,
    to_capsule,
)
from dovecote.vmmgr.lifecycle import CapsuleSettings, Lifecycle, new_capsule_id, remove_dir
from dovecote.vmmgr.machines import Machines

__all__ = [
    "FINAL_STATUSES", "NOT_FOUND", "ON_HOST", "AgentPool", "CapsuleSettings", "CapsuleStore",
    "Capsules", "Machines", "Status", "agent_errors", "check_path", "event_actor", "new_capsule_id",
    "remove_dir", "reply_of", "to_capsule",
]


class Capsules:
    """The capsule handlers of one vmmgr, and what the other vmmgr modules use of capsules."""

    def __init__(self, *, db: Database, publish: Publish, machines: Machines,
                 settings: CapsuleSettings, nursery: trio.Nursery, request: Request | None = None) -> None:
        self.db = db
        """The vmmgr database (the ``templates`` and ``builds`` tables live there too)."""
        self.store = CapsuleStore(db)
        self.machines = machines
        self.settings = settings
        self.host_id = settings.host_id
        self.nursery = nursery
        self.agents = AgentPool(nursery)
        self.events = EventRecorder(db=db, host_id=settings.host_id, publish=publish, request=request,
                                    nursery=nursery)
        self.lifecycle = Lifecycle(db=db, store=self.store, events=self.events, machines=machines,
                                   settings=settings, agents=self.agents, nursery=nursery, request=request)
        self.ops = AgentOps(store=self.store, machines=machines, agents=self.agents,
                            host_id=self.host_id, agent_timeout_s=settings.agent_timeout_s,
                            vm_locks=self.lifecycle.vm_locks, set_status=self.lifecycle.set_status)
        lc, ops = self.lifecycle, self.ops
        # The parts' entry points, as the other modules know them.
        self.set_status = lc.set_status
        self.finish_destroy, self.resume_boot = lc.finish_destroy, lc.resume_boot
        self.reconnect = lc.reconnect
        self.capsule_dir, self.vm_spec, self.busy = lc.capsule_dir, lc.vm_spec, lc.busy
        self.template_files, self.ask_host = lc.template_files, lc.ask_host
        self.lose_silent_capsules = lc.lose_silent_capsules
        self.create, self.list, self.lookup, self.destroy = lc.create, lc.list_capsules, lc.lookup, lc.destroy
        self.exec, self.ping, self.agent_of = ops.exec, ops.ping, ops.agent_of
        self.list_processes, self.kill_process = ops.list_processes, ops.kill_process
        self.write_file, self.read_file, self.remove_path = ops.write_file, ops.read_file, ops.remove_path
        self.list_dir, self.make_dir = ops.list_dir, ops.make_dir
        self.close_events = self.events.close
        self.finish_pause: Callable[[str, str], Awaitable[bool]] | None = None
        """``Snapshots.finish_pause`` once there is one: reconcile carries out a pause cut by a restart."""

    @property
    def request(self) -> Request | None:
        return self.lifecycle.request

    @request.setter
    def request(self, request: Request | None) -> None:
        self.lifecycle.request = self.events.request = request

    @property
    def pool(self) -> Any:
        """The :class:`~dovecote.vmmgr.pool.WarmPool` of restored, paused spares, if any."""
        return self.lifecycle.pool

    @pool.setter
    def pool(self, pool: Any) -> None:
        self.lifecycle.pool = pool

    @property
    def minimal(self) -> Any:
        """The built-in template's files once made (until then ``minimal`` capsules cold-boot)."""
        return self.lifecycle.minimal

    @minimal.setter
    def minimal(self, minimal: Any) -> None:
        self.lifecycle.minimal = minimal

    @property
    def vm_locks(self) -> dict[str, trio.Lock]:
        """Held while a capsule's VM is saved, restored or frozen."""
        return self.lifecycle.vm_locks

    def register(self, handle: Callable[[type, Any], None]) -> None:
        lc, ops = self.lifecycle, self.ops
        handle(m.CreateCapsule, lc.create)
        handle(m.ListCapsules, lc.list_capsules)
        handle(m.LookupCapsule, lc.lookup)
        handle(m.DestroyCapsule, lc.destroy)
        handle(m.ExecCommand, ops.exec)
        handle(m.ListProcesses, ops.list_processes)
        handle(m.KillProcess, ops.kill_process)
        handle(m.PingCapsule, ops.ping)
        handle(m.WriteFile, ops.write_file)
        handle(m.ReadFile, ops.read_file)
        handle(m.ListDir, ops.list_dir)
        handle(m.MakeDir, ops.make_dir)
        handle(m.RemovePath, ops.remove_path)

    async def find(self, actor: Any, capsule_id: str, admin: bool) -> Row:
        """The caller's capsule record (404 if it is not theirs)."""
        return await self.store.find(actor, capsule_id, admin)

    def require_local(self, row: Row) -> None:
        """503 ``wrong_host`` unless the capsule lives on this host."""
        require_local(row, self.host_id)

    async def touch(self, capsule_id: str) -> None:
        await self.store.touch(capsule_id)

    async def mark_host_unreachable(self, host_id: str) -> list[str]:
        return await self.store.mark_host_unreachable(host_id)

    async def mark_host_reachable(self, host_id: str, *, every_status: bool = False) -> list[str]:
        return await self.store.mark_host_reachable(host_id, every_status=every_status)

    def statistics(self) -> dict[str, int]:
        return {"agent_connections": len(self.agents), "booting": self.lifecycle.booting(),
                "spares": 0, **(self.pool.statistics() if self.pool is not None else {})}
