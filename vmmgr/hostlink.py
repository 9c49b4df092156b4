"""vmmgr and the hosts registry: this host's record, and the capsules on hosts.

* At start vmmgr makes sure its host exists in auth's registry
  (:class:`EnsureLocalHost`, as a platform host, status ``online``) and then
  heartbeats it (:class:`LocalHostHeartbeat`) well within the silence limit,
  so a vmmgr that dies is seen as ``unreachable`` after that limit.
* Any vmmgr answers :class:`ListHostCapsules` (the capsule table is shared)
  and :class:`DestroyHostCapsules` (forced host deletion): capsules of this
  host are destroyed here; a capsule of another host is handed to that host's
  vmmgr, or marked ``missing`` when that host does not answer.
* Silence is not death. ``host.state.changed`` to ``unreachable`` marks that
  host's capsules (``host_unreachable_since``) without changing their status:
  operations on them answer 503 ``host_unavailable`` at once. ``online``
  clears the mark, and the host's own vmmgr reconciles (re-adopting what
  survived). Only after ``DOVECOTE_HOST_LOST_AFTER_S`` of silence (default
  a day) does a capsule become ``missing``, and even then its returning host
  re-adopts a surviving VM (see :mod:`dovecote.vmmgr.reconcile`).
* ``team.deleted`` destroys the deleted team's capsules and snapshot templates on this host.
"""

from __future__ import annotations

import os
import platform
import shutil
from typing import Any

import trio

from dovecote.bus import BusError
from dovecote.bus.messages import auth_teams
from dovecote.bus.messages import hosts as h
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.runtime import ServiceContext
from dovecote.vmmgr.capsule_store import LIVE_STATUSES, Status
from dovecote.vmmgr.capsules import Capsules

log = get_logger("dovecote.vmmgr.hostlink")

HEARTBEAT_S = 30.0


def local_specs(data_dir: str) -> h.HostSpecs:
    """What this machine offers, for the hosts registry."""
    memory_mb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory_mb = int(line.split()[1]) // 1024
    except OSError:
        pass
    disk_gb = shutil.disk_usage(data_dir).total // (1024 ** 3) if os.path.isdir(data_dir) else None
    return h.HostSpecs(arch=platform.machine(), cpu_cores=os.cpu_count(), memory_mb=memory_mb,
                       disk_gb=disk_gb, address="127.0.0.1:0")  # port 0: listens nowhere


class HostLink:
    """This vmmgr's side of the hosts registry."""

    def __init__(self, ctx: ServiceContext[Any], capsules: Capsules) -> None:
        self.ctx = ctx
        self.capsules = capsules
        self.host_id: str = ctx.config.host_id

    def register(self) -> None:
        """Answer the hosts questions auth asks any vmmgr."""
        self.ctx.handle(h.ListHostCapsules, self.list_host_capsules)
        self.ctx.handle(h.DestroyHostCapsules, self.destroy_host_capsules)

    async def _capsules_of(self, host_id: str, team_id: str | None = None) -> list[str]:
        return await self.capsules.store.ids_on_host(
            host_id, excluding=(Status.STOPPED, Status.STOPPING), team_id=team_id)

    async def list_host_capsules(self, msg: h.ListHostCapsules) -> h.HostCapsules:
        return h.HostCapsules(capsule_ids=await self._capsules_of(msg.host_id))

    async def destroy_host_capsules(self, msg: h.DestroyHostCapsules) -> h.HostCapsules:
        ids = await self._capsules_of(msg.host_id)
        if msg.host_id == self.host_id:
            await self._destroy_local(ids)
            return h.HostCapsules(capsule_ids=ids)
        try:
            return await self.ctx.bus.request(f"vmmgr.{msg.host_id}", msg, timeout=10)
        except (BusError, ServiceError):
            pass
        # The host is gone: its VMs cannot be reached; the records say so.
        for capsule_id in ids:
            await self.capsules.set_status(capsule_id, Status.MISSING, only_from=LIVE_STATUSES,
                                           error="host deleted while unreachable")
        return h.HostCapsules(capsule_ids=ids)

    async def _destroy_local(self, ids: list[str]) -> None:
        live = tuple(s for s in Status if s not in (Status.STOPPED, Status.STOPPING))
        for capsule_id in ids:
            if await self.capsules.set_status(capsule_id, Status.STOPPING, only_from=live) is not None:
                await self.capsules.finish_destroy(capsule_id)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this host registered and heartbeating; follow host and team events."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_registered)
            nursery.start_soon(self._lose_silent_capsules)
            await nursery.start(self._follow_events)
            task_status.started()

    async def _lose_silent_capsules(self) -> None:
        """Every vmmgr, idempotently: capsules silent past the grace become ``missing``."""
        lost_after_s = float(self.ctx.config.host_lost_after_s)
        while True:
            await trio.sleep(min(30.0, max(1.0, lost_after_s / 4)))
            try:
                lost = await self.capsules.lose_silent_capsules(lost_after_s)
            except Exception:
                log.warning("could not sweep the capsules of silent hosts", exc_info=True)
                continue
            if lost:
                log.warning("capsules of a host silent for too long are missing",
                            extra={"capsule_ids": lost, "lost_after_s": lost_after_s})

    async def _keep_registered(self) -> None:
        ensured = False
        backoff = 0.5
        while True:
            try:
                if not ensured:
                    await self.ctx.bus.request("auth", h.EnsureLocalHost(
                        host_id=self.host_id, specs=local_specs(self.ctx.config.data_dir)),
                        timeout=10)
                else:
                    await self.ctx.bus.request(
                        "auth", h.LocalHostHeartbeat(host_id=self.host_id), timeout=10)
                ensured = True
                backoff = 0.5
                await trio.sleep(float(self.ctx.config.host_heartbeat_s))
                continue
            except ServiceError as exc:  # 404 on a heartbeat: ensure again
                ensured = False
                log.warning("host registry refused this host", extra={"error": repr(exc)})
            except BusError:
                pass  # auth not up yet or restarting
            await trio.sleep(backoff)
            backoff = min(backoff * 2, HEARTBEAT_S)

    async def _follow_events(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        async with self.ctx.bus.subscribe(h.HOST_STATE_TOPIC,
                                          auth_teams.TEAM_DELETED_TOPIC) as events:
            task_status.started()
            async for _topic, event in events:
                try:
                    await self._on_event(event)
                except Exception:
                    log.exception("could not apply an event", extra={"event": type(event).__name__})

    async def _on_event(self, event: Any) -> None:
        if isinstance(event, h.HostStateChanged):
            if event.new_status == "unreachable":
                marked = await self.capsules.mark_host_unreachable(event.host_id)
                if marked:
                    log.warning("a host went silent; its capsules wait for it",
                                extra={"host_id": event.host_id, "capsule_ids": marked})
            elif event.new_status == "online":
                await self.capsules.mark_host_reachable(event.host_id)
                if event.host_id == self.host_id and self.capsules.machines.driver is not None:
                    from dovecote.vmmgr.reconcile import reconcile

                    await reconcile(self.capsules)
        elif isinstance(event, auth_teams.TeamDeleted):
            await self._destroy_local(await self._capsules_of(self.host_id, event.team_id))
            await self._delete_templates(event.team_id)

    async def _delete_templates(self, team_id: str) -> None:
        """The deleted team's snapshot templates held by this host: files and records."""
        if not team_id:
            return
        rows = await self.capsules.db.fetchall(
            "DELETE FROM templates WHERE team_id = %s AND host_id = %s RETURNING *",
            (team_id, self.host_id))
        for row in rows:
            directory = self.capsules.template_files(row).directory
            await trio.to_thread.run_sync(shutil.rmtree, directory, True)
        if rows:
            log.info("templates of a deleted team removed", extra={"team_id": team_id, "count": len(rows)})
