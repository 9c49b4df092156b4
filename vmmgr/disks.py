"""A capsule's real disk: the size and usage of its root filesystem, as ``df`` in the guest counts them.

Why vmmgr asks the guest instead of trusting the request: ``disk_size_mb`` is
what a create asked for (capped), but the filesystem is what the guest has.
The guest image grows its root filesystem to its disk at every boot
(``infra/guest/build.py``), a capsule restored from a template keeps the
template's disk (a restored guest never sees another disk size), and ext4
keeps part of any disk for its own metadata. So the record holds the truth:

- when a capsule becomes ``running`` (boot, restore, a warm spare claimed),
  vmmgr takes the agent's last ``Pong`` (it carries ``statvfs("/")``: the
  connection's handshake, or a spare's ping after its warm-up) and stores, with
  the ``running`` status, ``disk_size_mb`` (f_blocks x f_frsize, df's "Size") and ``disk_used_mb``
  ((f_blocks - f_bfree) x f_frsize, df's "Used"), in MiB rounded up as
  ``df -B1M`` does;
- :func:`serve_disk_usage` refreshes both every :data:`REFRESH_S` for the
  running capsules of this host. A ping is not activity: the inactivity TTL
  is not reset by it.

An agent that predates these fields answers 0 and the record is left as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsule_store import Status
from dovecote.vmmgr.guest import AgentClient
from dovecote.vmmgr.guest import protocol as P

if TYPE_CHECKING:
    from dovecote.vmmgr.capsule_store import CapsuleStore
    from dovecote.vmmgr.capsules import Capsules

log = get_logger("dovecote.vmmgr.disks")

REFRESH_S = 15.0
"""How often the usage of running capsules is refreshed."""

PING_TIMEOUT_S = 5.0
MIB = 1024 * 1024


def usage_mb(pong: P.Pong | None) -> tuple[int, int] | None:
    """(size, used) in MiB from an agent's pong, rounded up as ``df -B1M`` rounds; None when
    the agent does not say."""
    if pong is None or pong.disk_total_bytes <= 0:
        return None
    return -(-pong.disk_total_bytes // MIB), -(-max(0, pong.disk_used_bytes) // MIB)


async def record(store: CapsuleStore, capsule_id: str, pong: P.Pong | None) -> tuple[int, int] | None:
    """Store what ``pong`` says of the capsule's root filesystem; returns (size, used) in MiB."""
    usage = usage_mb(pong)
    if usage is not None:
        await store.set_disk(capsule_id, *usage)
    return usage


async def refresh(store: CapsuleStore, capsule_id: str, client: AgentClient) -> tuple[int, int] | None:
    """Ask the capsule's agent now and store the answer."""
    pong = await client.ping(timeout=PING_TIMEOUT_S)
    return await record(store, capsule_id, pong)


async def serve_disk_usage(capsules: Capsules, *, interval_s: float = REFRESH_S,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Refresh the disk usage of this host's running capsules every ``interval_s``, forever."""
    task_status.started()
    while True:
        await trio.sleep(interval_s)
        driver = capsules.machines.driver
        if driver is None:
            continue
        try:
            ids = await capsules.store.ids_on_host(capsules.settings.host_id, statuses=[Status.RUNNING])
        except Exception:
            log.warning("disk usage scan failed", exc_info=True)
            continue
        for capsule_id in ids:
            lock = capsules.vm_locks.get(capsule_id)
            if lock is not None and lock.locked():
                continue  # being saved or snapshotted
            with trio.move_on_after(2 * PING_TIMEOUT_S):
                try:
                    socket_path = await driver.agent_socket(capsule_id)
                    client = await capsules.agents.get(capsule_id, str(socket_path),
                                                       connect_timeout=PING_TIMEOUT_S)
                    await refresh(capsules.store, capsule_id, client)
                except Exception as exc:  # the capsule changed state meanwhile, or its agent is busy
                    log.debug("disk usage not refreshed", extra={"capsule_id": capsule_id,
                                                                 "error": repr(exc)})
