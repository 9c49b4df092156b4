"""What happens to a host's capsules when its vmmgr stops, and when it starts again.

libvirt owns the capsules' VMs, so they outlive vmmgr. Left running after
``dovecote up`` stops, they would burn CPU with nothing to manage them; so a
graceful stop of vmmgr (SIGTERM: Ctrl-C of ``dovecote up``, or the parent
gone) pauses them and the next start resumes them:

1. the warm pool's spares are destroyed (they have no record);
2. every ``running`` capsule of this host is paused by the ordinary pause path
   (:meth:`~dovecote.vmmgr.snapshots.Snapshots.finish_pause`: RAM and device
   state saved to its ``memory.sav``, QEMU gone), recorded with
   ``pause_reason = 'shutdown'``; a capsule in a transition (``starting``,
   ``pausing``, ``resuming``, ``stopping``) is waited for and then judged
   again, so a boot that finishes during the stop is paused too;
3. all of it within ``DOVECOTE_VM_STOP_TIMEOUT_S`` (the service's stop grace
   is that long, and ``dovecote up`` waits for it before any SIGKILL). A
   capsule whose pause failed keeps running (the error is logged); one still
   mid-pause at the deadline is finished by libvirt and found ``paused`` by
   reconcile.

At the next start, after reconcile, vmmgr resumes the capsules of this host
that are ``paused`` with ``pause_reason = 'shutdown'``, and only those: a
capsule its user (or its TTL) paused stays paused. Their processes run on from
where they were. A resume that fails leaves the capsule paused, still marked,
so the start after tries again; none is resumed while the network guard is
down (the capsule would run unisolated).

``DOVECOTE_VM_KEEP_RUNNING=true`` (``dovecote up --keep-running``) skips step
2: the capsules run on under libvirt and reconcile keeps them at the next
start. A vmmgr killed with SIGKILL does nothing of this either, as before.

:func:`plan_stop` decides one round of the stop without I/O (tested as a
table); :func:`pause_for_shutdown` and :func:`resume_after_shutdown` do it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsule_store import IN_TRANSITION, SHUTDOWN_PAUSE, Status
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.snapshots import Snapshots

log = get_logger("dovecote.vmmgr.shutdown")

PARALLEL = 2
"""Pauses (or resumes) at a time: each one is a VM's RAM written to (or read from) disk."""
POLL_S = 0.2


@dataclass(kw_only=True)
class StopRound:
    """One look at the host's capsules during the stop; every list holds capsule ids."""

    pause: list[str] = field(default_factory=list)
    wait: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.pause and not self.wait


def plan_stop(rows: list[dict[str, Any]], tried: set[str]) -> StopRound:
    """Decide one round of the stop from this host's capsules (``id``, ``status``).

    ===========================  ==============================================
    status                       decision
    ===========================  ==============================================
    ``running``, not yet tried   pause it (reason ``shutdown``)
    ``running``, already tried   leave it: its pause failed (not retried)
    ``starting`` ``pausing``     wait: a task is moving it; judge it again once
    ``resuming`` ``stopping``    it lands (a boot that ends ``running`` is paused)
    anything else                nothing to do (no VM runs)
    ===========================  ==============================================

    The stop is over when a round has nothing to pause and nothing to wait for.
    """
    out = StopRound()
    for row in rows:
        status, capsule_id = row["status"], row["id"]
        if status == Status.RUNNING:
            if capsule_id not in tried:
                out.pause.append(capsule_id)
        elif status in IN_TRANSITION:
            out.wait.append(capsule_id)
    return out


@dataclass(kw_only=True)
class StopReport:
    paused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    """Capsules still in a transition when the time was up."""


async def pause_for_shutdown(capsules: Capsules, snapshots: Snapshots, *,
                             timeout_s: float) -> StopReport:
    """Pause every running capsule of this host (see the module docstring), within ``timeout_s``."""
    report = StopReport()
    if capsules.machines.driver is None:  # no VM was started by this process, none can be paused
        log.info("no VM driver yet: capsules are left as they are")
        return report
    limiter = trio.CapacityLimiter(PARALLEL)
    tried: set[str] = set()

    async def pause(capsule_id: str) -> None:
        async with limiter:
            ok = await snapshots.finish_pause(capsule_id, SHUTDOWN_PAUSE)
        (report.paused if ok else report.failed).append(capsule_id)

    began = trio.current_time()
    todo = StopRound()
    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:
            while True:
                rows = await capsules.store.on_host(capsules.host_id,
                                                    statuses=[Status.RUNNING, *IN_TRANSITION])
                todo = plan_stop(rows, tried)
                for capsule_id in todo.pause:
                    tried.add(capsule_id)
                    if await capsules.set_status(capsule_id, Status.PAUSING, only_from=(Status.RUNNING,),
                                                 pause_reason=SHUTDOWN_PAUSE):
                        nursery.start_soon(pause, capsule_id)
                if todo.done:
                    break
                await trio.sleep(POLL_S)
    report.left = [c for c in todo.wait if c not in report.paused]
    log_fn = log.warning if report.failed or report.left else log.info
    log_fn("capsules paused for the stop", extra={
        "paused": len(report.paused), "failed": report.failed, "left": report.left,
        "stop_s": round(trio.current_time() - began, 2)})
    return report


async def resume_after_shutdown(capsules: Capsules, snapshots: Snapshots) -> list[str]:
    """Resume the capsules of this host paused by a stop of vmmgr; returns those resumed."""
    if capsules.machines.isolation_error is not None:
        log.error("capsules paused by the last stop stay paused: the network guard is down",
                  extra={"reason": capsules.machines.isolation_error})
        return []
    ids = await capsules.store.paused_for(capsules.host_id, SHUTDOWN_PAUSE)
    if not ids:
        return []
    limiter = trio.CapacityLimiter(PARALLEL)
    resumed: list[str] = []
    began = trio.current_time()

    async def resume(capsule_id: str) -> None:
        async with limiter:
            if await snapshots.finish_resume(capsule_id):
                resumed.append(capsule_id)

    async with trio.open_nursery() as nursery:
        for capsule_id in ids:
            if await capsules.set_status(capsule_id, Status.RESUMING, only_from=(Status.PAUSED,)):
                nursery.start_soon(resume, capsule_id)
    log_fn = log.info if len(resumed) == len(ids) else log.warning
    log_fn("capsules paused by the last stop resumed", extra={
        "resumed": len(resumed), "of": len(ids), "resume_s": round(trio.current_time() - began, 2)})
    return resumed
