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

Once this host's desktop template is built (:mod:`dovecote.vmmgr.desktop`), the
pool also keeps ``size`` *desktop* spares: restored from that template and
warmed up. Under TCG a restored guest starts with QEMU's translation cache
empty, so the first commands after a restore run several times slower than
later ones (a desktop session's readiness checks took 1.5 s of its 4 s): a
desktop spare runs the commands of a session's readiness checks once (X's
size through xdotool as the desktop user, the desktop's marker file, a
screenshot), so a claimed one answers them at warm speed. A session's host
directory is added after the claim (``ShareDirectory``), so spares serve
every session.

Likewise, once the browser template is built (:mod:`dovecote.vmmgr.browser`), it keeps
``size`` *browser* spares: restored from that template and warmed up by one session's
worth of DevTools round trips (:func:`dovecote.vmmgr.browser.warm_up`: ``/json/version``
over the agent's TCP relay, the browser's WebSocket, attaching to the page and enabling
its domains, then detaching), so a browser session claims a VM whose Chromium already
answers at warm speed. Desktop and browser spares share the refill delay
(:data:`DESKTOP_REFILL_DELAY_S` after either is claimed).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dovecote.bus.messages.capsules import CapsuleSpec
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsules import Capsules, new_capsule_id, remove_dir
from dovecote.vmmgr.driver import DriverError
from dovecote.vmmgr.guest import errors as ge
from dovecote.vmmgr.templates import BROWSER, DESKTOP, MINIMAL

log = get_logger("dovecote.vmmgr.pool")

RETRY_S = 10.0
DESKTOP_REFILL_DELAY_S = 10.0
"""After a desktop spare is claimed, the next one is made this much later: under TCG making
one (QEMU's start, the warm-up) takes the CPU the claimed session's first checks need."""
DESKTOP_WARM_UP = (["xdotool", "getdisplaygeometry"], "/run/dovecote-desktop.ready")
"""What a desktop spare runs once (a command as the desktop user, a file read): the paths of
a desktop session's readiness checks (``services/desktops/qemu.py``)."""


class WarmPool:
    """Paused spares of the built-in template (see the module docstring)."""

    def __init__(self, capsules: Capsules, size: int, disk_size_mb: int) -> None:
        self.capsules = capsules
        self.size = size
        self.disk_size_mb = disk_size_mb
        self._ready: list[str] = []
        self._desktops: list[str] = []
        self._browsers: list[str] = []
        self._claimed: collections.deque[tuple[str, list[str]]] = collections.deque(maxlen=16)
        """The desktop and browser spares claimed last (a refused create gives its claim back
        at once)."""
        self._desktop_refill_at = 0.0
        """When the next desktop spare may be made (:data:`DESKTOP_REFILL_DELAY_S` after a claim)."""
        self._wanted = trio.Event()
        self._scope = trio.CancelScope()
        self._closed = False

    def __len__(self) -> int:
        return len(self._ready)

    def __contains__(self, capsule_id: object) -> bool:
        return capsule_id in self._ready or capsule_id in self._desktops or capsule_id in self._browsers

    def fits(self, spec: CapsuleSpec) -> bool:
        minimal = self.capsules.minimal
        return (minimal is not None and spec.template == MINIMAL
                and (spec.vcpus, spec.memory_mb) == (minimal.vcpus, minimal.memory_mb)
                and spec.disk_size_mb == self.disk_size_mb)

    def fits_desktop(self, spec: CapsuleSpec) -> bool:
        desktop = self.capsules.lifecycle.desktop
        return (desktop is not None and spec.template == DESKTOP
                and (spec.vcpus, spec.memory_mb) == (desktop.vcpus, desktop.memory_mb))

    def fits_browser(self, spec: CapsuleSpec) -> bool:
        browser = self.capsules.lifecycle.browser
        return (browser is not None and spec.template == BROWSER
                and (spec.vcpus, spec.memory_mb) == (browser.vcpus, browser.memory_mb))

    def claim(self, spec: CapsuleSpec) -> str | None:
        """A spare's capsule id for a capsule of ``spec``, or None (then create as usual)."""
        if self._closed:
            return None
        spares = (self._desktops if self.fits_desktop(spec)
                  else self._browsers if self.fits_browser(spec) else None)
        if spares:
            capsule_id = spares.pop(0)
            self._claimed.append((capsule_id, spares))
            self._desktop_refill_at = trio.current_time() + DESKTOP_REFILL_DELAY_S
        elif self._ready and self.fits(spec):
            capsule_id = self._ready.pop(0)
        else:
            return None
        self._wanted.set()
        return capsule_id

    def give_back(self, capsule_id: str) -> None:
        """A claimed spare that was not used after all (the create was refused)."""
        for claimed in self._claimed:
            if claimed[0] == capsule_id:
                self._claimed.remove(claimed)
                claimed[1].insert(0, capsule_id)
                return
        self._ready.insert(0, capsule_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``size`` spares once the template is ready, until :meth:`close`."""
        task_status.started()
        with self._scope:
            while True:
                minimal = self.capsules.minimal is not None and len(self._ready) < self.size
                desktop = (self.capsules.lifecycle.desktop is not None
                           and len(self._desktops) < self.size)
                browser = (self.capsules.lifecycle.browser is not None
                           and len(self._browsers) < self.size)
                if not minimal and not desktop and not browser:
                    self._wanted = trio.Event()
                    with trio.move_on_after(RETRY_S):
                        await self._wanted.wait()
                    continue
                if not minimal:
                    await trio.sleep_until(self._desktop_refill_at)
                spares = self._ready if minimal else self._desktops if desktop else self._browsers
                try:
                    spare = await (self._make_spare() if minimal else self._make_desktop_spare()
                                   if desktop else self._make_browser_spare())
                except (DriverError, OSError, trio.TooSlowError, ge.AgentError) as exc:
                    log.warning("could not make a spare VM", extra={"error": str(exc)})
                    await trio.sleep(RETRY_S)
                    continue
                if self._closed:
                    await self._discard(spare)
                    return
                spares.append(spare)

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

    async def _make_desktop_spare(self) -> str:
        """A desktop spare: restored from the desktop template and warmed up (see the module)."""

        async def warm(client: Any, capsule_id: str) -> None:
            argv, marker = DESKTOP_WARM_UP
            await client.exec(argv, timeout=60)
            await client.read_file_bytes(marker, timeout=60)
            await self.capsules.machines.require()[0].screenshot(capsule_id)

        desktop = self.capsules.lifecycle.desktop
        assert desktop is not None
        return await self._make_warm_spare("desktop", desktop, warm)

    async def _make_browser_spare(self) -> str:
        """A browser spare: restored from the browser template and warmed up (see the module)."""
        from dovecote.vmmgr.browser import warm_up

        async def warm(client: Any, capsule_id: str) -> None:
            await warm_up(client)

        browser = self.capsules.lifecycle.browser
        assert browser is not None
        return await self._make_warm_spare("browser", browser, warm)

    async def _make_warm_spare(self, kind: str, files: Any,
                               warm: Callable[[Any, str], Awaitable[None]]) -> str:
        """A VM restored from the template ``files`` whose agent answers, warmed by ``warm``
        (its guest agent client, its id); discarded if any step fails."""
        driver, _ = self.capsules.machines.require()
        capsule_id = new_capsule_id()
        spec = await self.capsules.vm_spec(capsule_id, vcpus=files.vcpus, memory_mb=files.memory_mb,
                                           disk_size_mb=self.disk_size_mb, template=files)
        await driver.create(spec)
        try:
            timeout = self.capsules.settings.boot_timeout_s
            with trio.fail_after(timeout):
                client = await self.capsules.agents.get(capsule_id, str(spec.agent_socket_path),
                                                        connect_timeout=timeout)
                await warm(client, capsule_id)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(capsule_id)
            raise
        log.info(f"{kind} spare ready", extra={"capsule_id": capsule_id})
        return capsule_id

    async def _drain(self) -> None:
        while self._ready:
            await self._discard(self._ready.pop())
        while self._desktops:
            await self._discard(self._desktops.pop())
        while self._browsers:
            await self._discard(self._browsers.pop())

    async def _discard(self, capsule_id: str) -> None:
        self.capsules.agents.forget(capsule_id)
        driver: Any = self.capsules.machines.driver
        if driver is not None:
            try:
                await driver.destroy(capsule_id)
            except DriverError:
                pass
        await trio.to_thread.run_sync(remove_dir, self.capsules.capsule_dir(capsule_id))
