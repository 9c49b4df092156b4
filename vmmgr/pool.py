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
pool fills again. A reconcile while vmmgr serves (its host back online) leaves the
pool's VMs alone, those being made included: a spare's id is in the pool
(``_making``) before its directory and VM exist, until it is in a list or discarded.

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

Every spare is also pushed a throwaway identity once it answers (:meth:`WarmPool._warm_identity`;
all but the clock): under TCG the guest's first ``SetIdentity`` after a restore ran 0.3-1.5 s
(cold translation cache: the agent's thread pool, the hostname, hosts and machine-id writes),
the second a few milliseconds. A claim then pushes the capsule's real identity (fresh
machine id, RNG seed, clock, hostname) at warm speed, before ``running``.

*Team spares* (``team_size``, ``DOVECOTE_VM_TEAM_SPARES``): spares of a team's snapshot
templates, warmed by usage. Each create from a snapshot template is counted per (team,
template); one that a team created from :data:`HOT_CREATES` times within
:data:`HOT_WINDOW_S` gets a spare, restored from that template and warmed like the
others. At most ``team_size`` team spares per host and ``team_max`` per team; when more
templates are hot, the most recently used ones win (LRU: the others' spares are
destroyed), and a template not created from within the window loses its spare. A team
spare is claimed only by a create of the same team from the same template (the key is
the team id and the template's id, so a template deleted and made again under the same
name never gets the old one's spare; a platform template's spares are per team too):
one team's snapshot is never handed to another. Deleting a template destroys its spares
(:meth:`WarmPool.forget_template`). The policy is :class:`TeamDemand` (no I/O).

*Pre-started VMs* (``prestarted``, ``DOVECOTE_VM_PRESTARTED``): QEMU processes of the
``minimal`` shape started ahead of time by libvirt (:meth:`Driver.prestart`), each under a
fresh capsule id in its own capsule directory (a running domain cannot be renamed), its
overlay made, its vCPUs stopped, waiting for the template's device state (``-incoming
defer``). libvirt's ``createXML`` (about half a second, half of it libvirt reading the
guest CPU back) is then off a create's path. A create of the ``minimal`` shape that finds
no warm spare claims one (:meth:`WarmPool.claim_prestarted`): the device state is loaded
and the vCPUs run (:meth:`Driver.finish_restore`, ~50 ms), the agent connects and the
full identity is pushed, overlapping the record's insert as a spare's push does. A waiting
one costs no CPU and ~47 MiB of RSS (a warm spare: ~7% of a core). One whose template
changed since it was started is destroyed, never claimed; like spares they have no
record (reconcile destroys them as orphans after a crash, :meth:`WarmPool.close` at stop).
Drivers without :attr:`Driver.supports_prestart` get none: creates restore as usual.
"""

from __future__ import annotations

import collections
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from dovecote.bus.messages.capsules import CapsuleSpec
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsules import Capsules, new_capsule_id, remove_dir
from dovecote.vmmgr.driver import DriverError
from dovecote.vmmgr.guest import errors as ge
from dovecote.vmmgr.templates import BROWSER, DESKTOP, MINIMAL, TemplateFiles

log = get_logger("dovecote.vmmgr.pool")

RETRY_S = 10.0
DESKTOP_REFILL_DELAY_S = 10.0
"""After a desktop spare is claimed, the next one is made this much later: under TCG making
one (QEMU's start, the warm-up) takes the CPU the claimed session's first checks need."""
SPARE_REFILL_DELAY_S = 1.0
"""After a ``minimal`` or team spare is claimed, the next one is made this much later, so
that its restore (QEMU's start through libvirt, CPU-heavy under TCG on 2 cores) does not
compete with the claim's identity push and status update."""
DESKTOP_WARM_UP = (["xdotool", "getdisplaygeometry"], "/run/dovecote-desktop.ready")
"""What a desktop spare runs once (a command as the desktop user, a file read): the paths of
a desktop session's readiness checks (``services/desktops/qemu.py``)."""
HOT_CREATES = 2
"""Creates of one team template within :data:`HOT_WINDOW_S` that earn it a spare."""
HOT_WINDOW_S = 600.0

TeamKey = tuple[str, str]
"""A team spare's key: (team id, template id)."""


@dataclass
class TeamDemand:
    """Which team templates deserve a spare: pure bookkeeping, no I/O.

    ``note`` counts a create of ``key`` at ``now``; :meth:`wanted` answers the keys that
    deserve a spare at ``now``, most recently used first:

    ======================================  ==========================================
    the key's creates within ``window_s``   spare
    ======================================  ==========================================
    fewer than ``hot_creates``              no (a template created from once, or long ago)
    at least ``hot_creates``                yes, unless ``team_max`` keys of its team or
                                            ``host_max`` keys in all were used more
                                            recently (least recently used loses)
    ======================================  ==========================================
    """

    host_max: int
    team_max: int
    hot_creates: int = HOT_CREATES
    window_s: float = HOT_WINDOW_S
    _uses: collections.OrderedDict[TeamKey, list[float]] = field(default_factory=collections.OrderedDict)

    def note(self, key: TeamKey, now: float) -> None:
        uses = self._uses.pop(key, [])
        uses.append(now)
        self._uses[key] = uses[-self.hot_creates:]  # the last one used goes last

    def __contains__(self, key: object) -> bool:
        return key in self._uses

    def forget_template(self, template_id: str) -> None:
        for key in [k for k in self._uses if k[1] == template_id]:
            del self._uses[key]

    def wanted(self, now: float) -> list[TeamKey]:
        for key in [k for k, uses in self._uses.items() if uses[-1] < now - self.window_s]:
            del self._uses[key]  # cold: forgotten
        chosen: list[TeamKey] = []
        per_team: collections.Counter[str] = collections.Counter()
        for key in reversed(self._uses):
            if len(chosen) >= self.host_max:
                break
            uses = self._uses[key]
            if (len(uses) >= self.hot_creates and uses[-self.hot_creates] >= now - self.window_s
                    and per_team[key[0]] < self.team_max):
                chosen.append(key)
                per_team[key[0]] += 1
        return chosen


class WarmPool:
    """Paused spares of the built-in template (see the module docstring)."""

    def __init__(self, capsules: Capsules, size: int, disk_size_mb: int, *,
                 team_size: int = 0, team_max: int = 1, prestarted: int = 0) -> None:
        self.capsules = capsules
        self.size = size
        self.prestarted = prestarted
        self._waiting: list[tuple[str, TemplateFiles, tuple[int, int]]] = []
        """The pre-started VMs: capsule id, the template and its state file's (inode, mtime)."""
        self.disk_size_mb = disk_size_mb
        self.demand = TeamDemand(host_max=team_size, team_max=team_max)
        self._team: dict[TeamKey, list[str]] = {}
        """The ready team spares of each key (one at most)."""
        self._team_files: dict[TeamKey, TemplateFiles] = {}
        self._claims = collections.Counter[str]()
        self._ready: list[str] = []
        self._desktops: list[str] = []
        self._browsers: list[str] = []
        self._claimed: collections.deque[tuple[str, list[str]]] = collections.deque(maxlen=256)
        """The spares claimed last and the list each came from (a refused create gives its
        claim back to that list; one no longer here is destroyed, never put in another)."""
        self._refill_at = 0.0
        """When the next ``minimal`` or team spare may be made (:data:`SPARE_REFILL_DELAY_S`)."""
        self._desktop_refill_at = 0.0
        """When the next desktop spare may be made (:data:`DESKTOP_REFILL_DELAY_S` after a claim)."""
        self._making: set[str] = set()
        """The spares and pre-started VMs being made: named here before their directory and
        VM exist, until they are in a list above (or discarded). A reconcile running meanwhile
        sees their VMs without records; they are the pool's, not orphans (``__contains__``)."""
        self._wanted = trio.Event()
        self._scope = trio.CancelScope()
        self._closed = False

    def __len__(self) -> int:
        return len(self._ready)

    def __contains__(self, capsule_id: object) -> bool:
        """``capsule_id`` is a VM of the pool's: held, or being made."""
        return (capsule_id in self._making
                or capsule_id in self._ready or capsule_id in self._desktops or capsule_id in self._browsers
                or any(capsule_id == waiting[0] for waiting in self._waiting)
                or any(capsule_id in spares for spares in self._team.values()))

    def statistics(self) -> dict[str, int]:
        """What vmmgr's health shows: spares ready and claimed, by kind."""
        return {"spares": len(self._ready), "team_spares": sum(map(len, self._team.values())),
                "spare_claims": self._claims["minimal"], "team_spare_claims": self._claims["team"],
                "prestarted": len(self._waiting), "prestarted_claims": self._claims["prestarted"]}

    # -- team spares ---------------------------------------------------------------

    def note_team_create(self, team_id: str, template: dict[str, Any], files: TemplateFiles) -> None:
        """A capsule of ``team_id`` was created from the snapshot template row ``template``."""
        if self.demand.host_max <= 0 or self._closed:
            return
        key = (team_id, str(template["id"]))
        self._team_files[key] = files
        self.demand.note(key, trio.current_time())
        self._wanted.set()

    def claim_team(self, team_id: str, template: dict[str, Any]) -> str | None:
        """A spare restored from ``template`` for a create of ``team_id``, or None: only
        ever one made for that same team and template."""
        if self._closed:
            return None
        spares = self._team.get((team_id, str(template["id"])))
        if not spares:
            return None
        capsule_id = spares.pop(0)
        self._claimed.append((capsule_id, spares))
        self._claims["team"] += 1
        self._refill_at = trio.current_time() + SPARE_REFILL_DELAY_S
        self._wanted.set()
        return capsule_id

    async def forget_template(self, template_id: str) -> None:
        """The template is deleted: destroy its spares (one being made is discarded when done)."""
        self.demand.forget_template(template_id)
        for key in [k for k in self._team if k[1] == template_id]:
            spares = self._team.pop(key)
            self._team_files.pop(key, None)
            for capsule_id in spares:
                log.info("team spare destroyed: its template was deleted",
                         extra={"capsule_id": capsule_id, "template_id": template_id})
                await self._discard(capsule_id)
        self._wanted.set()

    async def _evict_team(self) -> None:
        """Destroy the team spares no longer wanted (cold, or pushed out by hotter ones)."""
        wanted = set(self.demand.wanted(trio.current_time()))
        for key in [k for k in self._team if k not in wanted]:
            for capsule_id in self._team.pop(key):
                log.info("team spare evicted", extra={"capsule_id": capsule_id, "team_id": key[0],
                                                      "template_id": key[1]})
                await self._discard(capsule_id)
        for key in [k for k in self._team_files if k not in self.demand]:
            del self._team_files[key]

    def _team_needed(self) -> TeamKey | None:
        """The most recently used wanted key that has no spare, if any."""
        for key in self.demand.wanted(trio.current_time()):
            if not self._team.get(key) and key in self._team_files:
                return key
        return None

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
            self._claimed.append((capsule_id, self._ready))
            self._claims["minimal"] += 1
            self._refill_at = trio.current_time() + SPARE_REFILL_DELAY_S
        else:
            return None
        self._wanted.set()
        return capsule_id

    def claim_prestarted(self, spec: CapsuleSpec) -> tuple[str, TemplateFiles] | None:
        """A pre-started VM for a capsule of ``spec`` and the template whose device state to
        load into it (:meth:`Driver.finish_restore`), or None. It is the caller's from now
        on: one not used is given back (:meth:`give_back` destroys it)."""
        if self._closed or not self._waiting or not self.fits(spec):
            return None
        while self._waiting:
            capsule_id, files, stamp = self._waiting.pop(0)
            if self._current(files, stamp):
                self._claims["prestarted"] += 1
                self._refill_at = trio.current_time() + SPARE_REFILL_DELAY_S
                self._wanted.set()
                return capsule_id, files
            log.info("pre-started VM destroyed: its template changed", extra={"capsule_id": capsule_id})
            self.capsules.nursery.start_soon(self._discard, capsule_id)
        self._wanted.set()
        return None

    def _current(self, files: TemplateFiles, stamp: tuple[int, int]) -> bool:
        """``files`` is still the ``minimal`` template, its state the one a VM was started for."""
        return files == self.capsules.minimal and _stamp(files) == stamp

    def _can_prestart(self) -> bool:
        return bool(getattr(self.capsules.machines.driver, "supports_prestart", False))

    async def _drop_stale_prestarted(self) -> None:
        for waiting in list(self._waiting):
            if not await trio.to_thread.run_sync(self._current, waiting[1], waiting[2]):
                if waiting in self._waiting:
                    self._waiting.remove(waiting)
                    log.info("pre-started VM destroyed: its template changed",
                             extra={"capsule_id": waiting[0]})
                    await self._discard(waiting[0])

    async def _make_prestarted(self) -> tuple[str, TemplateFiles, tuple[int, int]]:
        """A ``minimal`` VM started by libvirt, waiting for the device state (see the module)."""
        driver, _ = self.capsules.machines.require()
        files = self.capsules.minimal
        assert files is not None
        stamp = await trio.to_thread.run_sync(_stamp, files)
        capsule_id = self._new_id()
        try:
            spec = await self.capsules.vm_spec(capsule_id, vcpus=files.vcpus, memory_mb=files.memory_mb,
                                               disk_size_mb=self.disk_size_mb, template=files)
            await driver.prestart(spec)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(capsule_id)
            raise
        return capsule_id, files, stamp

    def _new_id(self) -> str:
        """A fresh capsule id for a spare or pre-started VM about to be made, in
        :attr:`_making` (so that reconcile leaves its VM alone) until :meth:`_made`."""
        capsule_id = new_capsule_id()
        self._making.add(capsule_id)
        return capsule_id

    def _made(self, capsule_id: str) -> None:
        """The VM made under ``capsule_id`` is in a list now, or discarded."""
        self._making.discard(capsule_id)

    def give_back(self, capsule_id: str) -> None:
        """A claimed spare that was not used after all (the create was refused)."""
        for claimed in self._claimed:
            if claimed[0] == capsule_id:
                self._claimed.remove(claimed)
                if not self._closed and any(claimed[1] is spares for spares in (
                        self._ready, self._desktops, self._browsers, *self._team.values())):
                    claimed[1].insert(0, capsule_id)
                    return
                break  # its team template was deleted or evicted meanwhile, or the pool closed
        # Never guess where an unknown spare belongs (another team's snapshot must not
        # become a minimal spare): destroy it.
        self.capsules.nursery.start_soon(self._discard, capsule_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``size`` spares once the template is ready, until :meth:`close`."""
        task_status.started()
        with self._scope:
            while True:
                self._wanted = trio.Event()
                await self._evict_team()
                await self._drop_stale_prestarted()
                minimal = self.capsules.minimal is not None and len(self._ready) < self.size
                prestart = (not minimal and self.capsules.minimal is not None
                            and len(self._waiting) < self.prestarted and self._can_prestart())
                team = None if minimal or prestart else self._team_needed()
                desktop = (self.capsules.lifecycle.desktop is not None
                           and len(self._desktops) < self.size)
                browser = (self.capsules.lifecycle.browser is not None
                           and len(self._browsers) < self.size)
                if not minimal and not prestart and team is None and not desktop and not browser:
                    with trio.move_on_after(RETRY_S):
                        await self._wanted.wait()
                    continue
                await trio.sleep_until(self._refill_at if minimal or prestart or team is not None
                                       else max(self._refill_at, self._desktop_refill_at))
                try:
                    if prestart:
                        waiting = await self._make_prestarted()
                        try:
                            if self._closed:
                                await self._discard(waiting[0])
                                return
                            self._waiting.append(waiting)
                        finally:
                            self._made(waiting[0])
                        continue
                    if minimal:
                        spares, spare = self._ready, await self._make_spare()
                    elif team is not None:
                        spares, spare = self._team.setdefault(team, []), await self._make_team_spare(team)
                    elif desktop:
                        spares, spare = self._desktops, await self._make_desktop_spare()
                    else:
                        spares, spare = self._browsers, await self._make_browser_spare()
                except (DriverError, OSError, trio.TooSlowError, ge.AgentError) as exc:
                    log.warning("could not make a spare VM", extra={"error": str(exc)})
                    await trio.sleep(RETRY_S)
                    continue
                try:
                    if self._closed:
                        await self._discard(spare)
                        return
                    if team is not None and (team not in self.demand.wanted(trio.current_time())
                                             or self._team.get(team) is not spares):
                        await self._discard(spare)  # its template was deleted, or it went cold, meanwhile
                        continue
                    spares.append(spare)
                finally:
                    self._made(spare)

    async def close(self) -> None:
        """Stop making spares and destroy the ones held (call while the driver is connected)."""
        self._closed = True
        self._scope.cancel()
        await self._drain()

    async def _make_spare(self) -> str:
        minimal = self.capsules.minimal
        assert minimal is not None
        return await self._make_warm_spare("minimal", minimal, None)

    async def _make_team_spare(self, key: TeamKey) -> str:
        """A spare restored from a team's snapshot template (see the module)."""
        capsule_id = await self._make_warm_spare("team", self._team_files[key], None)
        log.info("team spare ready", extra={"capsule_id": capsule_id, "team_id": key[0],
                                            "template_id": key[1]})
        return capsule_id

    async def _warm_identity(self, client: Any, capsule_id: str) -> None:
        """Push a throwaway identity once (see the module: the claim's push then runs warm),
        and read the disk again after it (the claim stores that ``Pong``'s disk usage).

        Not the clock: a spare whose clock was set here and again at its claim answered its
        first signal and process listing after the claim 1-2 s late (measured on TCG; with
        the clock set only at the claim, as before, ~0.1 s), which failed
        ``test_capsules_vm``'s kill-then-list. Setting the clock at the claim stays cheap."""
        timeout = self.capsules.settings.agent_timeout_s
        await client.set_identity(hostname=capsule_id, machine_id=uuid.uuid4().hex,
                                  rng_seed=os.urandom(64),
                                  env={"DOVECOTE_CAPSULE_ID": capsule_id}, timeout=timeout)
        client.pong = await client.ping(timeout=timeout)

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
                               warm: Callable[[Any, str], Awaitable[None]] | None) -> str:
        """A VM restored from the template ``files`` whose agent answers, its identity pushed
        once and warmed by ``warm`` (its guest agent client, its id); discarded if any step
        fails."""
        driver, _ = self.capsules.machines.require()
        capsule_id = self._new_id()
        try:
            spec = await self.capsules.vm_spec(capsule_id, vcpus=files.vcpus, memory_mb=files.memory_mb,
                                               disk_size_mb=self.disk_size_mb, template=files)
            await driver.create(spec)
            timeout = self.capsules.settings.boot_timeout_s
            with trio.fail_after(timeout):
                client = await self.capsules.agents.get(capsule_id, str(spec.agent_socket_path),
                                                        connect_timeout=timeout)
                await self._warm_identity(client, capsule_id)
                if warm is not None:
                    await warm(client, capsule_id)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._discard(capsule_id)
            raise
        if kind in ("desktop", "browser"):
            log.info(f"{kind} spare ready", extra={"capsule_id": capsule_id})
        return capsule_id

    async def _drain(self) -> None:
        while self._waiting:
            await self._discard(self._waiting.pop()[0])
        while self._ready:
            await self._discard(self._ready.pop())
        while self._desktops:
            await self._discard(self._desktops.pop())
        while self._browsers:
            await self._discard(self._browsers.pop())
        for spares in self._team.values():
            while spares:
                await self._discard(spares.pop())

    async def _discard(self, capsule_id: str) -> None:
        try:
            self.capsules.agents.forget(capsule_id)
            driver: Any = self.capsules.machines.driver
            if driver is not None:
                try:
                    await driver.destroy(capsule_id)
                except DriverError:
                    pass
            await trio.to_thread.run_sync(remove_dir, self.capsules.capsule_dir(capsule_id))
        finally:
            self._made(capsule_id)  # one being made and discarded is no longer the pool's


def _stamp(files: TemplateFiles) -> tuple[int, int]:
    """The template's state file's (inode, mtime): a rebuilt template has another (blocking)."""
    try:
        st = os.stat(files.state)
    except OSError:
        return (0, 0)
    return (st.st_ino, st.st_mtime_ns)
