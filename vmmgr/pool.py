"""A warm pool: spare VMs restored from the built-in template, their agents connected.

Creating a capsule from a template costs starting QEMU through libvirt
(about half a second, most of a create). The pool pays that ahead of time:
it keeps ``size`` spares of the default ``minimal`` shape (1 vCPU, 512 MB,
the default disk) restored from the template, running idle with vmmgr
connected to their agents, each under a fresh capsule id with its files in
its own capsule directory. A create of that shape claims one (the capsule
takes the spare's id), so its boot is only the identity push (fresh machine
id, RNG seed, clock, hostname); the pool then makes a new spare in the
background.

An idle spare costs an idle guest's CPU and the memory it touched (the guest
RAM is the template file, mapped copy-on-write). Spares have no database record:
if vmmgr stops, reconcile destroys them as orphans at the next start, and the
pool fills again.
"""

from __future__ import annotations

from typing import Any

import trio

from dovecote.bus.messages.capsules import CapsuleSpec
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsules import Capsules, new_capsule_id, remove_dir
from dovecote.vmmgr.driver import DriverError
from dovecote.vmmgr.guest import errors as ge
from dovecote.vmmgr.templates import MINIMAL

log = get_logger("dovecote.vmmgr.pool")

RETRY_S = 10.0


class WarmPool:
    """Paused spares of the built-in template (see the module docstring)."""

    def __init__(self, capsules: Capsules, size: int, disk_size_mb: int) -> None:
        self.capsules = capsules
        self.size = size
        self.disk_size_mb = disk_size_mb
        self._ready: list[str] = []
        self._wanted = trio.Event()
        self._scope = trio.CancelScope()
        self._closed = False

    def __len__(self) -> int:
        return len(self._ready)

    def __contains__(self, capsule_id: object) -> bool:
        return capsule_id in self._ready

    def fits(self, spec: CapsuleSpec) -> bool:
        minimal = self.capsules.minimal
        return (minimal is not None and spec.template == MINIMAL
                and (spec.vcpus, spec.memory_mb) == (minimal.vcpus, minimal.memory_mb)
                and spec.disk_size_mb == self.disk_size_mb)

    def claim(self, spec: CapsuleSpec) -> str | None:
        """A spare's capsule id for a capsule of ``spec``, or None (then create as usual)."""
        if self._closed or not self._ready or not self.fits(spec):
            return None
        capsule_id = self._ready.pop(0)
        self._wanted.set()
        return capsule_id

    def give_back(self, capsule_id: str) -> None:
        """A claimed spare that was not used after all (the create was refused)."""
        self._ready.insert(0, capsule_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``size`` spares once the template is ready, until :meth:`close`."""
        task_status.started()
        with self._scope:
            while True:
                if self.capsules.minimal is None or len(self._ready) >= self.size:
                    self._wanted = trio.Event()
                    with trio.move_on_after(RETRY_S):
                        await self._wanted.wait()
                    continue
                try:
                    spare = await self._make_spare()
                except (DriverError, OSError, trio.TooSlowError, ge.AgentError) as exc:
                    log.warning("could not make a spare VM", extra={"error": str(exc)})
                    await trio.sleep(RETRY_S)
                    continue
                if self._closed:
                    await self._discard(spare)
                    return
                self._ready.append(spare)

    async def close(self) -> None:
        """Stop making spares and destroy the ones held (call while the driver is connected)."""
        self._closed = True
        self._scope.cancel()
        await self._drain()

    async def _make_spare(self) -> str:
        minimal = self.capsules.minimal
        assert minimal is not None
        driver, _ = self.capsules.machines.require()
        capsule_id = new_capsule_id()
        spec = await self.capsules.vm_spec(capsule_id, vcpus=minimal.vcpus, memory_mb=minimal.memory_mb,
                                           disk_size_mb=self.disk_size_mb, template=minimal)
        await driver.create(spec)
        try:
            with trio.fail_after(self.capsules.settings.boot_timeout_s):
                await self.capsules.agents.get(capsule_id, str(spec.agent_socket_path),
                                               connect_timeout=self.capsules.settings.boot_timeout_s)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(capsule_id)
            raise
        return capsule_id

    async def _drain(self) -> None:
        while self._ready:
            await self._discard(self._ready.pop())

    async def _discard(self, capsule_id: str) -> None:
        self.capsules.agents.forget(capsule_id)
        driver: Any = self.capsules.machines.driver
        if driver is not None:
            try:
                await driver.destroy(capsule_id)
            except DriverError:
                pass
        await trio.to_thread.run_sync(remove_dir, self.capsules.capsule_dir(capsule_id))
