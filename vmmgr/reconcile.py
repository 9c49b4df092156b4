"""Reconcile this host's VMs with the capsule records when vmmgr starts.

libvirt owns the VMs, so they outlive a crash (even a SIGKILL) of vmmgr; the
database outlives everything. At start vmmgr compares the two and converges:

=======================================  ==========================================
what it finds                            what it does
=======================================  ==========================================
a VM of ours, live record here           keep it (``running`` stays ``running``);
                                         a ``starting`` one finishes its boot, a
                                         ``stopping`` one its destroy
a VM of ours, no live record             destroy it (an orphan: its record was
                                         stopped, or never committed), unless the
                                         warm pool holds it or is making it
a VM of ours, record on another host     leave it alone and warn (two vmmgrs share
                                         one libvirt under different host ids)
a live record here, no running VM        ``missing`` (``stopping`` → ``stopped``)
a VM of ours, record here ``missing``    re-adopt it: ``running`` again (the host was
because the host went silent             silent past ``DOVECOTE_HOST_LOST_AFTER_S``;
(``host_unreachable_since`` set)         the VM survived, nobody destroyed it)
no VM, record here ``missing`` because   ``paused`` again when its saved memory is
the host went silent                     on disk, else it stays ``missing``
=======================================  ==========================================

A host that returns from silence is not judged by its records' ``missing``:
only a record that a user or an operator made final (``stopped``, a
``stopping`` destroy, a host deletion) lets a surviving VM be destroyed.

:func:`plan` decides without I/O (tested on its own); :func:`reconcile` reads
both sides and applies the plan through :class:`~dovecote.vmmgr.capsules.Capsules`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsule_events import Happened
from dovecote.vmmgr.capsule_store import LIVE_STATUSES, SHUTDOWN_PAUSE, Status
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.driver import DriverError, VmInfo, VmState

log = get_logger("dovecote.vmmgr.reconcile")


@dataclass(kw_only=True)
class Plan:
    """What reconcile will do; every list holds capsule ids."""

    keep: list[str] = field(default_factory=list)
    resume_boot: list[str] = field(default_factory=list)
    finish_destroy: list[str] = field(default_factory=list)
    destroy_orphans: list[str] = field(default_factory=list)
    mark_missing: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    readopt: list[str] = field(default_factory=list)
    """``missing`` after a silence, VM running: ``running`` again."""
    readopt_saved: list[str] = field(default_factory=list)
    """``missing`` after a silence, no VM: ``paused`` again if its saved memory is there."""


def _settled(was: str, now: Status) -> Happened | None:
    """The event of a pause or resume that a restart interrupted and reconcile settles as ``now``."""
    action = {Status.PAUSING: "pause", Status.RESUMING: "resume"}.get(Status(was))
    if action is None:
        return None
    if (was, now) in ((Status.PAUSING, Status.PAUSED), (Status.RESUMING, Status.RUNNING)):
        return Happened(f"capsule.{action}")
    return Happened(f"capsule.{action}", outcome="error",
                    error=f"vmmgr stopped during the {action}; the capsule is {now}")


def _lost_in_silence(record: dict[str, Any], host_id: str) -> bool:
    return (record["host_id"] == host_id and record["status"] == Status.MISSING
            and record.get("host_unreachable_since") is not None)


def plan(vms: list[VmInfo], records: dict[str, dict[str, Any]], host_id: str) -> Plan:
    """Decide what to do with each VM and each record.

    Args:
        vms: this host's VMs (the driver's list).
        records: every capsule row whose id is a VM's or that is live on this host.
        host_id: this host.
    """
    out = Plan()
    live = set(LIVE_STATUSES)
    running_vms = {vm.handle.capsule_id for vm in vms
                   if vm.state in (VmState.RUNNING, VmState.PAUSED, VmState.OTHER)}
    for vm in vms:
        capsule_id = vm.handle.capsule_id
        record = records.get(capsule_id)
        if record is not None and record["host_id"] != host_id:
            out.foreign.append(capsule_id)
        elif record is not None and _lost_in_silence(record, host_id) and capsule_id in running_vms:
            out.readopt.append(capsule_id)
        elif record is None or record["status"] not in live or capsule_id not in running_vms:
            out.destroy_orphans.append(capsule_id)
        elif record["status"] == Status.STARTING:
            out.resume_boot.append(capsule_id)
        elif record["status"] == Status.STOPPING:
            out.finish_destroy.append(capsule_id)
        else:
            out.keep.append(capsule_id)
    for capsule_id, record in records.items():
        if _lost_in_silence(record, host_id) and capsule_id not in running_vms:
            out.readopt_saved.append(capsule_id)
            continue
        if record["host_id"] != host_id or record["status"] not in live:
            continue
        if capsule_id in running_vms:
            continue
        if record["status"] == Status.STOPPING:
            out.finish_destroy.append(capsule_id)
        else:
            out.mark_missing.append(capsule_id)
    return out


def ours(vms: list[VmInfo], run_dir: Path) -> list[VmInfo]:
    """The VMs whose files live under ``run_dir`` (this installation's)."""
    root = Path(os.path.abspath(run_dir))
    return [vm for vm in vms if root in Path(os.path.abspath(vm.handle.agent_socket_path)).parents]


async def reconcile(capsules: Capsules) -> Plan:
    """Converge this host's VMs and records (see the module docstring)."""
    driver = capsules.machines.driver
    assert driver is not None
    # What this process works on at any moment of the look (before the listing and
    # after the records are read) is not for a reconcile running while it serves to judge.
    busy = capsules.busy()
    # One libvirtd may serve several installations (data directories); only
    # VMs whose files live under this vmmgr's run directory are ours to judge.
    vms = ours(await driver.list(), capsules.settings.run_dir)
    # The warm pool's spares have no record on purpose: not orphans while it holds them,
    # nor while it makes them (a spare's VM is listed before the pool holds it).
    pool = capsules.pool
    vms = [vm for vm in vms if pool is None or vm.handle.capsule_id not in pool]
    ids = [vm.handle.capsule_id for vm in vms]
    rows = await capsules.store.for_reconcile(capsules.host_id, ids)
    # A reconcile also runs while vmmgr serves (when its host is back online, or
    # right after start-up accepted a create): what this process is working on
    # now is not for it to judge.
    busy |= capsules.busy()
    if pool is not None:
        busy |= {capsule_id for capsule_id in ids if capsule_id in pool}
    vms = [vm for vm in vms if vm.handle.capsule_id not in busy]
    records = {row["id"]: row for row in rows if row["id"] not in busy}
    todo = plan(vms, records, capsules.host_id)
    sockets = {vm.handle.capsule_id: str(vm.handle.agent_socket_path) for vm in vms}
    for capsule_id in todo.foreign:
        log.warning("a VM of a capsule of another host runs here; left alone",
                    extra={"capsule_id": capsule_id, "host_id": records[capsule_id]["host_id"]})
    for capsule_id in todo.destroy_orphans:
        log.warning("destroying an orphan VM", extra={"capsule_id": capsule_id})
        try:
            await driver.destroy(capsule_id)
        except DriverError:
            log.warning("could not destroy an orphan VM", exc_info=True,
                        extra={"capsule_id": capsule_id})
    for capsule_id in todo.mark_missing:
        status = records[capsule_id]["status"]
        saved = capsules.capsule_dir(capsule_id) / "memory.sav"
        if status in (Status.PAUSING, Status.RESUMING) and await trio.to_thread.run_sync(saved.exists):
            # Interrupted between the save and the restore: the saved VM is intact. A pause
            # is done; a resume failed (the log has one event for each that was asked).
            await capsules.set_status(capsule_id, Status.PAUSED, only_from=(status,),
                                      event=_settled(status, Status.PAUSED))
            continue
        await capsules.set_status(capsule_id, Status.MISSING, only_from=LIVE_STATUSES,
                                  error=None, event=_settled(status, Status.MISSING))
    for capsule_id in todo.keep:
        record = records[capsule_id]
        if (record["status"] == Status.PAUSING and record["pause_reason"] != SHUTDOWN_PAUSE
                and capsules.finish_pause is not None):
            # A pause the client (or the idle timeout) asked for, cut before its save:
            # the VM runs, so it is carried out now (it logs its own capsule.pause).
            capsules.nursery.start_soon(capsules.finish_pause, capsule_id, record["pause_reason"] or "user")
            continue
        if record["status"] in (Status.PAUSING, Status.RESUMING):
            # The VM runs: whichever step was interrupted, it is running now (a pause
            # for a stop of vmmgr is not wanted any more: vmmgr is back).
            try:
                await capsules.reconnect(capsule_id, sockets[capsule_id])
            except Exception:
                log.warning("could not reach a resumed capsule's agent", exc_info=True,
                            extra={"capsule_id": capsule_id})
            await capsules.set_status(capsule_id, Status.RUNNING, only_from=(Status.PAUSING, Status.RESUMING),
                                      event=_settled(record["status"], Status.RUNNING))
    for capsule_id in todo.readopt:
        log.info("re-adopting a capsule that survived its host's silence", extra={"capsule_id": capsule_id})
        try:
            await capsules.reconnect(capsule_id, sockets[capsule_id])
        except Exception:
            log.warning("could not reach a re-adopted capsule's agent", exc_info=True,
                        extra={"capsule_id": capsule_id})
        await capsules.set_status(capsule_id, Status.RUNNING, only_from=(Status.MISSING,))
    for capsule_id in todo.readopt_saved:
        saved = capsules.capsule_dir(capsule_id) / "memory.sav"
        if await trio.to_thread.run_sync(saved.exists):
            await capsules.set_status(capsule_id, Status.PAUSED, only_from=(Status.MISSING,))
    # This host answers: none of its capsules is waiting for it any more.
    await capsules.mark_host_reachable(capsules.host_id, every_status=True)
    for capsule_id in todo.finish_destroy:
        capsules.nursery.start_soon(capsules.finish_destroy, capsule_id)
    for capsule_id in todo.resume_boot:
        capsules.nursery.start_soon(capsules.resume_boot, records[capsule_id], sockets[capsule_id])
    log.info("reconciled", extra={"kept": len(todo.keep), "orphans": len(todo.destroy_orphans),
                                  "missing": len(todo.mark_missing),
                                  "readopted": len(todo.readopt) + len(todo.readopt_saved),
                                  "resumed": len(todo.resume_boot),
                                  "destroying": len(todo.finish_destroy)})
    return todo
