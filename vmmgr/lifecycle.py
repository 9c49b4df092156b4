"""The life of a capsule's VM: create, boot, destroy, and what reconcile resumes.

Life of a capsule (every change is one guarded ``UPDATE`` in
:class:`~dovecote.vmmgr.capsule_store.CapsuleStore` and one
``capsule.state.changed`` event)::

    create ──> starting ──boot ok──> running ──destroy──> stopping ──> stopped
                  │                                          ▲
                  └──boot failed──> error ──destroy──────────┘
    (reconcile at start) live record without a VM ──> missing

Create checks the team's caps under a per-team advisory lock, inserts the
row as ``starting`` and answers at once; the boot runs as a task in the
service nursery: driver.create, wait for the guest agent (ping), push a
fresh identity (hostname, machine id, RNG seed, clock), then ``running``.
A create that claims a warm spare (:mod:`dovecote.vmmgr.pool`) takes the spare's id
and starts its identity push at the claim, before placement and the insert; its boot
only waits for that push, then writes ``running`` (see :class:`Claim`). With no warm
spare, a ``minimal`` create claims a pre-started VM the same way: at the claim its
device state is loaded, its vCPUs run, its agent connects and the identity is pushed.
A boot is cancelled by a destroy that arrives meanwhile. A create placed on
another host, or from a template another host holds, is forwarded to that
host's vmmgr.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from dovecote.bus.messages import capsules as m
from dovecote.bus.messages import hosts as h
from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import rfc3339
from dovecote.vmmgr import disks, placement
from dovecote.vmmgr.agent_ops import AgentPool
from dovecote.vmmgr.capsule_events import EventRecorder, Happened
from dovecote.vmmgr.capsule_store import (
    ON_HOST,
    CapsuleStore,
    Row,
    Status,
    reply_of,
    require_local,
    to_capsule,
)
from dovecote.vmmgr.driver import DriverError, VmNotFound, VmSpec
from dovecote.vmmgr.guest import errors as ge
from dovecote.vmmgr.images import GuestImage
from dovecote.vmmgr.machines import Machines
from dovecote.vmmgr.templates import BROWSER, DESKTOP, MINIMAL, TemplateFiles

log = get_logger("dovecote.vmmgr.capsules")

Request = Callable[..., Awaitable[Any]]
T = TypeVar("T")

FORWARD_TIMEOUT_S = 10.0
"""How long a create forwarded to another host may take to be accepted there."""


def new_capsule_id() -> str:
    """``cap-`` and 16 hex digits (a valid libvirt domain suffix)."""
    return "cap-" + secrets.token_hex(8)


@dataclass(frozen=True, kw_only=True)
class CapsuleSettings:
    host_id: str
    run_dir: Path
    """Per-capsule files (overlay, agent socket, console log) live in ``run_dir/<id>/``."""
    limits: placement.Limits = field(default_factory=placement.Limits)
    boot_timeout_s: float = 300.0
    agent_timeout_s: float = 10.0
    host_max_capsules: int = 0
    host_max_memory_mb: int = 0
    template_dir: Path | None = None
    """Team snapshot templates live in ``template_dir/<template id>/``."""


class Lifecycle:
    """Create, boot and destroy the capsules of one vmmgr; the status changes they make."""

    def __init__(self, *, db: Database, store: CapsuleStore, events: EventRecorder, machines: Machines,
                 settings: CapsuleSettings, agents: AgentPool, nursery: trio.Nursery,
                 request: Request | None) -> None:
        self.db = db
        self.store = store
        self.events = events
        self.machines = machines
        self.settings = settings
        self.host_id = settings.host_id
        self.agents = agents
        self.nursery = nursery
        self.request = request
        self.minimal: TemplateFiles | None = None
        """The built-in template once made (until then ``minimal`` capsules cold-boot)."""
        self.desktop: TemplateFiles | None = None
        """The desktop template once made on this host (:mod:`dovecote.vmmgr.desktop`)."""
        self.browser: TemplateFiles | None = None
        """The browser template once made on this host (:mod:`dovecote.vmmgr.browser`)."""
        self.pool: Any = None
        """The :class:`~dovecote.vmmgr.pool.WarmPool` of restored, paused spares, if any."""
        self.vm_locks: dict[str, trio.Lock] = {}
        """Held while a capsule's VM is saved, restored or frozen."""
        self._boots: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self._starting: set[str] = set()
        """Created here, boot task not started yet (see :meth:`busy`)."""
        self._destroying: set[str] = set()

    # -- status changes ------------------------------------------------------------

    async def set_status(self, capsule_id: str, new: str, *, only_from: tuple[str, ...] | None = None,
                         error: str | None = None, metadata: dict[str, str] | None = None,
                         pause_reason: str | None = None, disk: tuple[int, int] | None = None,
                         event: Happened | None = None) -> Row | None:
        """Move a capsule to ``new`` (if its status is one of ``only_from``) and publish it.

        See :meth:`CapsuleStore.set_status`. The move's ``capsule.state.changed``
        and ``event`` (the lifecycle event it reports, if any) commit with it.
        Returns the updated row, or None when the guard did not match.
        """
        stage = self.events.stager(event)
        row = await self.store.set_status(capsule_id, Status(new), only_from=only_from, error=error,
                                          metadata=metadata, pause_reason=pause_reason, disk=disk,
                                          stage=stage)
        if row is None:
            return None
        if stage is not None:
            self.events.nudge()
        if row["old_status"] != new:
            log.info("capsule status", extra={"capsule_id": capsule_id, "old": row["old_status"],
                                               "new": str(new), "error": error})
            await self.events.announce(row, row["old_status"])
        return row

    # -- create, list, lookup --------------------------------------------------

    async def create(self, msg: m.CreateCapsule) -> m.CapsuleReply:
        steps = Steps()
        actor = msg.actor
        if not actor.team_id:
            raise ServiceError(403, "forbidden", "a team is required to create capsules")
        template = await self._template_row(actor, msg.spec.template)
        steps.mark("template")
        if msg.spec.template in (DESKTOP, BROWSER):
            msg = self._desktop_request(msg)
        claims: list[Claim] = []
        if template is None:
            # An impossible request is the client's error (400 naming the limit)
            # whatever the hosts' state: checked before placement and the driver.
            checked = placement.normalize_spec(msg.spec, self.settings.limits,
                                               known_template=msg.spec.template in (DESKTOP, BROWSER))
            # A spare is claimed, and its identity push started, before placement: the push
            # is the claim's longest step. Placed elsewhere or refused, it is given back.
            if self.pool is not None:
                self._claim(self.pool.claim(checked), claims)
                if not claims:
                    self._claim_prestarted(self.pool.claim_prestarted(checked), claims)
        try:
            return await self._create(msg, template, steps, claims)
        finally:
            for claim in claims:
                if not claim.used:
                    self.nursery.start_soon(self._give_back, claim)

    def _claim(self, capsule_id: str | None, claims: list[Claim]) -> None:
        """Take the spare ``capsule_id`` (if any) for this create and start its identity push.

        Busy from now on (see :meth:`busy`): a reconcile must not take it for an orphan."""
        if capsule_id is None:
            return
        self._starting.add(capsule_id)
        client = self.agents.connected(capsule_id)
        claim = Claim(capsule_id=capsule_id, push=IdentityPush() if client is not None else None)
        if claim.push is not None:
            # The push overlaps placement and the record's insert: the capsule becomes
            # ``running`` only once both are done (see _greet).
            self.nursery.start_soon(self._push_early, client, capsule_id, claim.push)
        claims.append(claim)

    def _claim_prestarted(self, found: tuple[str, TemplateFiles] | None, claims: list[Claim]) -> None:
        """Take the pre-started VM of ``found`` (its id, its template) and start its restore,
        agent connection and identity push (busy from now on, as a spare)."""
        if found is None:
            return
        capsule_id, files = found
        self._starting.add(capsule_id)
        claim = Claim(capsule_id=capsule_id, push=IdentityPush())
        assert claim.push is not None
        self.nursery.start_soon(self._restore_early, capsule_id, files, claim.push)
        claims.append(claim)

    async def _restore_early(self, capsule_id: str, files: TemplateFiles, push: IdentityPush) -> None:
        try:
            driver, _ = self.machines.require()
            with trio.fail_after(self.settings.boot_timeout_s):
                try:
                    await driver.finish_restore(capsule_id, files.state)
                except DriverError as exc:  # it died waiting, say: the template's restore, whole
                    log.warning("a pre-started VM could not take the template's state; restoring anew",
                                extra={"capsule_id": capsule_id, "error": str(exc)})
                    await self._destroy_quietly(driver, capsule_id)
                    spec = await self.vm_spec(capsule_id, vcpus=files.vcpus, memory_mb=files.memory_mb,
                                              disk_size_mb=self.pool.disk_size_mb, template=files)
                    await driver.create(spec)
                client = await self.agents.get(capsule_id, str(self.capsule_dir(capsule_id) / "agent.sock"),
                                               connect_timeout=self.settings.boot_timeout_s)
                push.steps = await self._push_identity(client, capsule_id)
        except Exception as exc:  # the boot raises it
            push.error = exc
        finally:
            push.done.set()

    @staticmethod
    async def _destroy_quietly(driver: Any, capsule_id: str) -> None:
        try:
            await driver.destroy(capsule_id)
        except DriverError:
            pass

    async def _create(self, msg: m.CreateCapsule, template: Row | None, steps: Steps,
                      claims: list[Claim]) -> m.CapsuleReply:
        actor = msg.actor
        if template is None and not msg.placed:
            host_id = await self._place(actor, msg.spec)
            steps.mark("place")
            if host_id != self.host_id:
                return await self._forward(host_id, msg)
        await self.machines.require_soon()
        self.machines.require_isolation()
        if template is not None:
            if template["host_id"] != self.host_id:
                # A snapshot is restored on the host that holds its files.
                if self.request is None:
                    raise ServiceError(503, "wrong_host", "the template lives on another host")
                return await self._forward(template["host_id"], msg)
            spec = placement.normalize_spec(
                m.CapsuleSpec(template=template["name"], vcpus=template["vcpus"],
                              memory_mb=template["memory_mb"], disk_size_mb=msg.spec.disk_size_mb,
                              timeout_sec=msg.spec.timeout_sec, metadata=msg.spec.metadata),
                self.settings.limits, known_template=True)
        else:
            spec = placement.normalize_spec(msg.spec, self.settings.limits,
                                            known_template=msg.spec.template in (DESKTOP, BROWSER))
        if template is not None and self.pool is not None:
            self._claim(self.pool.claim_team(actor.team_id, template), claims)
        steps.mark("claim")
        claim = claims[0] if claims else None
        capsule_id = claim.capsule_id if claim is not None else new_capsule_id()
        push = claim.push if claim is not None else None
        settings = self.settings

        def check(team: placement.Usage, host: Callable[[], placement.Usage]) -> None:
            placement.check_team_caps(team, spec, settings.limits)
            if settings.host_max_capsules or settings.host_max_memory_mb:
                placement.check_host_capacity(host(), spec, max_capsules=settings.host_max_capsules,
                                              max_memory_mb=settings.host_max_memory_mb)

        # Busy from before its record exists: a reconcile running meanwhile (a host back
        # online) must not judge a live record whose boot has not started yet.
        self._starting.add(capsule_id)
        try:
            row = await self.store.insert(capsule_id=capsule_id, team_id=actor.team_id,
                                          created_by=actor.user_id or actor.api_key_id,
                                          host_id=self.host_id, spec=spec, check=check,
                                          stage=self.events.stager(Happened("capsule.create", actor)))
        except BaseException:
            if claim is None:  # a claimed spare stays busy until it is given back
                self._starting.discard(capsule_id)
            raise
        if claim is not None:
            claim.used = True
        self.events.nudge()
        steps.mark("insert")
        try:
            await self.events.announce(row, None)
        except BaseException:
            self._starting.discard(capsule_id)
            raise
        steps.mark("announce")
        log.info("capsule created", extra={"capsule_id": capsule_id, "team_id": actor.team_id})
        files = None
        if template is not None:
            files = self.template_files(template)
            if self.pool is not None:  # usage warms the team's spares (vmmgr/pool.py)
                self.pool.note_team_create(actor.team_id, template, files)
        elif spec.template == MINIMAL and self.minimal is not None and (
                self.minimal.vcpus, self.minimal.memory_mb) == (spec.vcpus, spec.memory_mb):
            files = self.minimal
        elif spec.template == DESKTOP:
            files = self.desktop
        elif spec.template == BROWSER:
            files = self.browser
        self.nursery.start_soon(self._boot, row, files, claim is not None, steps, push)
        return reply_of(row)

    async def _push_early(self, client: Any, capsule_id: str, push: IdentityPush) -> None:
        try:
            push.steps = await self._push_identity(client, capsule_id)
        except Exception as exc:  # the boot raises it
            push.error = exc
        finally:
            push.done.set()

    async def _give_back(self, claim: Claim) -> None:
        """A claimed spare the create did not use, back to the pool once its push is over
        (a later claim's push must come last)."""
        try:
            if claim.push is not None:
                with trio.move_on_after(self.settings.agent_timeout_s + 1):
                    await claim.push.done.wait()
            if self.pool is not None:
                self.pool.give_back(claim.capsule_id)
        finally:
            self._starting.discard(claim.capsule_id)

    async def _place(self, actor: Principal, spec: m.CapsuleSpec) -> str:
        """The host for a new capsule (:func:`placement.choose_host`); this one when alone."""
        if self.request is None:
            return self.host_id
        try:
            reply = await self.request("auth", h.ListPlacementHosts(team_id=actor.team_id), timeout=5.0)
        except Exception as exc:  # auth away: a single-host suite still works
            log.warning("placement without the host list", extra={"error": repr(exc)})
            return self.host_id
        if not isinstance(reply, h.PlacementHosts) or not reply.hosts:
            return self.host_id
        usage = await self.store.usage_by_host()
        candidates = [placement.Candidate(
            id=host.id, type=host.type, team_id=host.team_id, tags=frozenset(host.tags),
            memory_mb=host.memory_mb or None, usage=usage.get(host.id, placement.Usage()))
            for host in reply.hosts]
        return placement.choose_host(candidates, team_id=actor.team_id, spec=spec,
                                     local_host_id=self.host_id)

    async def _forward(self, host_id: str, msg: m.CreateCapsule) -> m.CapsuleReply:
        """Create on another host (its ``vmmgr.<host_id>`` worker)."""
        log.info("capsule placed on another host", extra={"host_id": host_id})
        return await self.ask_host(host_id, m.CreateCapsule(actor=msg.actor, spec=msg.spec, placed=True),
                                   m.CapsuleReply, timeout_s=FORWARD_TIMEOUT_S)

    async def ask_host(self, host_id: str, msg: Any, expect: type[T], *, timeout_s: float = 30.0) -> T:
        """Hand ``msg`` to the vmmgr of ``host_id`` (what lives there is done there).

        Its refusal is raised as it is; silence is 503 ``host_unavailable``.
        """
        if self.request is None:
            raise ServiceError(503, "wrong_host", f"that lives on host {host_id}, which is unreachable")
        try:
            reply = await self.request(f"vmmgr.{host_id}", msg, timeout=timeout_s)
        except ServiceError:
            raise  # its refusal, as it is
        except Exception as exc:
            raise ServiceError(503, "host_unavailable", f"host {host_id} does not answer; retry later",
                               retry_after=30) from exc
        if not isinstance(reply, expect):
            raise ServiceError(502, "host_error", f"host {host_id} answered {type(reply).__name__}")
        return reply

    def _desktop_request(self, msg: m.CreateCapsule) -> m.CreateCapsule:
        """A ``desktop`` (or ``browser``) capsule: restored from this host's template of that
        name, in its shape (no placement: the template's files are here); 503 until the
        template is built."""
        kind = msg.spec.template
        files = self.desktop if kind == DESKTOP else self.browser
        if files is None:
            ensure = "EnsureDesktopTemplate" if kind == DESKTOP else "EnsureBrowserTemplate"
            raise ServiceError(503, f"{kind}_template_unavailable",
                               f"the {kind} template is not built on host {self.host_id} yet "
                               f"(capsules.{ensure} builds it)", retry_after=60)
        spec = msgspec.structs.replace(msg.spec, vcpus=files.vcpus, memory_mb=files.memory_mb,
                                       disk_size_mb=min(msg.spec.disk_size_mb,
                                                        self.settings.limits.max_disk_size_mb))
        return msgspec.structs.replace(msg, spec=spec, placed=True)

    async def _template_row(self, actor: Principal, name: str) -> Row | None:
        """The team's (or a platform) snapshot template called ``name``; None for ``minimal``."""
        if name in (MINIMAL, DESKTOP, BROWSER) or not name:
            return None
        row = await self.db.fetchone(
            "SELECT * FROM templates WHERE name = %s AND team_id IN (%s, '') AND status = 'ready' "
            "ORDER BY team_id DESC LIMIT 1", (name, actor.team_id))
        if row is None:
            raise ServiceError(404, "template_not_found", f"template {name!r} not found")
        return row

    def template_files(self, row: Row) -> TemplateFiles:
        if self.settings.template_dir is None:
            raise ServiceError(503, "templates_unavailable", "this host keeps no templates")
        return TemplateFiles(directory=self.settings.template_dir / row["id"], vcpus=row["vcpus"],
                             memory_mb=row["memory_mb"])

    async def list_capsules(self, msg: m.ListCapsules) -> m.CapsuleList:
        if msg.all_teams and not msg.actor.is_admin:
            raise ServiceError(403, "forbidden", "platform admin access required")
        rows = await self.store.newest(None if msg.all_teams else msg.actor.team_id)
        return m.CapsuleList(capsules=[to_capsule(r) for r in rows])

    async def lookup(self, msg: m.LookupCapsule) -> m.CapsuleReply:
        row = await self.store.find(msg.actor, msg.capsule_id, msg.admin)
        silent_since = row.get("host_unreachable_since")
        if msg.operation and silent_since is not None:
            raise ServiceError(503, "host_unavailable",
                               f"capsule {row['id']} runs on host {row['host_id']}, which has not answered "
                               f"since {rfc3339(silent_since)}; retry when it is back", retry_after=30)
        return reply_of(row)

    # -- hosts that go quiet -------------------------------------------------------

    async def lose_silent_capsules(self, lost_after_s: float) -> list[str]:
        """Capsules whose host has been silent for ``lost_after_s``: ``missing`` (marker kept)."""
        lost = []
        for capsule_id in await self.store.silent_for(lost_after_s):
            if await self.set_status(capsule_id, Status.MISSING, only_from=ON_HOST,
                                     error=f"host unreachable for more than {lost_after_s:.0f} s"):
                lost.append(capsule_id)
        return lost

    # -- boot --------------------------------------------------------------------

    def capsule_dir(self, capsule_id: str) -> Path:
        return self.settings.run_dir / capsule_id

    async def _boot(self, row: Row, template: TemplateFiles | None = None,
                    pooled: bool = False, steps: Steps | None = None,
                    push: IdentityPush | None = None) -> None:
        """Run a ``starting`` capsule's VM until its agent answers, then mark it ``running``.

        With ``template`` the VM is restored from it instead of booted; ``pooled``: the
        VM is a running spare of :class:`~dovecote.vmmgr.pool.WarmPool`, only greeted.
        """
        capsule_id = row["id"]
        done = trio.Event()
        scope = trio.CancelScope()
        self._boots[capsule_id] = (scope, done)
        began = time.monotonic()
        steps = steps or Steps()
        try:
            with scope:
                try:
                    with trio.fail_after(self.settings.boot_timeout_s):
                        metadata, disk = await self._start_vm(row, template, pooled, steps, push)
                except BaseException as exc:
                    if isinstance(exc, trio.Cancelled):
                        raise
                    text = "boot timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                    log.warning("capsule boot failed", exc_info=not isinstance(exc, ServiceError),
                                extra={"capsule_id": capsule_id, "error": text})
                    if await self.set_status(capsule_id, Status.ERROR, only_from=(Status.STARTING,),
                                             error=text[:2000] or type(exc).__name__):
                        await self.destroy_vm(capsule_id)
                    return
                if await self.set_status(capsule_id, Status.RUNNING, only_from=(Status.STARTING,),
                                         metadata=metadata, disk=disk) is None:
                    return  # destroyed meanwhile
                steps.mark("running")
                log.info("capsule running", extra={"capsule_id": capsule_id, "pooled": pooled,
                                                   "boot_s": round(time.monotonic() - began, 2),
                                                   "steps_ms": steps.ms})
        finally:
            done.set()
            self._starting.discard(capsule_id)
            if self._boots.get(capsule_id, (None,))[0] is scope:
                self._boots.pop(capsule_id, None)

    def busy(self) -> set[str]:
        """Capsules with an operation in flight in this process (booting, saving,
        restoring, destroying): a reconcile running meanwhile must leave them alone."""
        locked = {capsule_id for capsule_id, lock in self.vm_locks.items() if lock.locked()}
        return set(self._boots) | self._starting | self._destroying | locked

    def booting(self) -> int:
        return len(self._boots)

    async def vm_spec(self, capsule_id: str, *, vcpus: int, memory_mb: int, disk_size_mb: int,
                      template: TemplateFiles | None = None) -> VmSpec:
        """The VM of a capsule, its files in :meth:`capsule_dir` (created here)."""
        _, image = self.machines.require()
        self.machines.require_isolation()
        directory = self.capsule_dir(capsule_id)
        await trio.to_thread.run_sync(_make_dir, directory)
        base = self.machines.base_size_mib
        disk = disk_size_mb if base is None or disk_size_mb >= base else None
        spec = VmSpec(capsule_id=capsule_id, image=image, vcpus=vcpus,
                      memory_mib=memory_mb, overlay_path=directory / "disk.qcow2",
                      agent_socket_path=directory / "agent.sock",
                      console_log_path=directory / "console.log", disk_size_mib=disk)
        return template.restore_spec(spec) if template is not None else spec

    async def _start_vm(self, row: Row, template: TemplateFiles | None = None,
                        pooled: bool = False, steps: Steps | None = None,
                        push: IdentityPush | None = None
                        ) -> tuple[dict[str, str], tuple[int, int] | None]:
        driver, image = self.machines.require()
        capsule_id = row["id"]
        if pooled:  # a warm spare: restored, running, its agent connected (no libvirt lookup)
            socket_path = self.capsule_dir(capsule_id) / "agent.sock"
        else:
            spec = await self.vm_spec(capsule_id, vcpus=row["vcpus"], memory_mb=row["memory_mb"],
                                      disk_size_mb=row["disk_size_mb"], template=template)
            socket_path = (await driver.create(spec)).agent_socket_path
        if steps is not None:
            steps.mark("vm")
        return await self._greet(capsule_id, str(socket_path), image,
                                 connect_timeout=self.settings.boot_timeout_s, steps=steps, push=push)

    async def _greet(self, capsule_id: str, socket_path: str, image: GuestImage | None, *,
                     connect_timeout: float, steps: Steps | None = None,
                     push: IdentityPush | None = None
                     ) -> tuple[dict[str, str], tuple[int, int] | None]:
        """Wait for the agent, push a fresh identity; returns version metadata and the
        disk's (size, used) from the agent's handshake ``Pong`` (:mod:`dovecote.vmmgr.disks`:
        stored with the ``running`` status, no second ping). With ``push``, the identity
        push already started (a claimed spare's, at its claim): wait for it."""
        timer = steps or Steps()
        client = await self.agents.get(capsule_id, socket_path, connect_timeout=connect_timeout)
        timer.mark("agent")
        if push is not None:
            await push.done.wait()
            if push.error is not None:
                raise push.error
            assert push.steps is not None
            steps_done = push.steps
        else:
            steps_done = await self._push_identity(client, capsule_id)
        timer.mark("identity")
        failed = [f"{s.step}: {s.detail}" for s in steps_done if s.status == "error"]
        if failed:
            log.warning("identity steps failed", extra={"capsule_id": capsule_id, "steps": failed})
        metadata: dict[str, str] = {}
        if client.pong is not None:
            metadata["agent_version"] = client.pong.agent_version
        if image is not None:
            metadata["kernel_version"] = image.kernel_version
        return metadata, disks.usage_mb(client.pong)

    async def _push_identity(self, client: Any, capsule_id: str) -> list[Any]:
        """A fresh identity: hostname, machine id, RNG seed, clock, the capsule id variable."""
        steps: list[Any] = await client.set_identity(
            hostname=capsule_id, machine_id=uuid.uuid4().hex, rng_seed=os.urandom(64),
            clock_unix_ns=time.time_ns(), env={"DOVECOTE_CAPSULE_ID": capsule_id},
            timeout=self.settings.agent_timeout_s)
        return steps

    async def reconnect(self, capsule_id: str, socket_path: str) -> None:
        """After a restore of the capsule's own VM: reconnect the agent and set its clock."""
        self.agents.close(capsule_id)
        client = await self.agents.get(capsule_id, socket_path,
                                       connect_timeout=self.settings.boot_timeout_s)
        await client.set_identity(clock_unix_ns=time.time_ns(), timeout=self.settings.agent_timeout_s)

    async def resume_boot(self, row: Row, socket_path: str) -> None:
        """Finish the boot of a capsule whose VM runs but whose boot was interrupted (reconcile)."""
        capsule_id = row["id"]
        try:
            with trio.fail_after(self.settings.boot_timeout_s):
                metadata, disk = await self._greet(capsule_id, socket_path, self.machines.image,
                                                   connect_timeout=self.settings.boot_timeout_s)
        except (ge.AgentError, trio.TooSlowError, OSError) as exc:
            if await self.set_status(capsule_id, Status.ERROR, only_from=(Status.STARTING,),
                                     error=str(exc)):
                await self.destroy_vm(capsule_id)
            return
        await self.set_status(capsule_id, Status.RUNNING, only_from=(Status.STARTING,), metadata=metadata,
                              disk=disk)

    # -- destroy -----------------------------------------------------------------

    async def destroy(self, msg: m.DestroyCapsule) -> m.CapsuleReply:
        row = await self.store.find(msg.actor, msg.capsule_id, msg.admin)
        require_local(row, self.host_id)
        if row["status"] in (Status.STOPPED, Status.STOPPING):
            return reply_of(row)
        stopping = await self.set_status(row["id"], Status.STOPPING,
                                         only_from=tuple(s for s in Status
                                                         if s not in (Status.STOPPED, Status.STOPPING)))
        if stopping is None:  # raced with another destroy
            return reply_of(await self.store.find(msg.actor, msg.capsule_id, msg.admin))
        self.nursery.start_soon(self.finish_destroy, row["id"])
        return reply_of(stopping)

    async def finish_destroy(self, capsule_id: str) -> None:
        """``stopping`` → VM gone, files removed → ``stopped``."""
        if capsule_id in self._destroying:
            return
        self._destroying.add(capsule_id)
        try:
            boot = self._boots.get(capsule_id)
            if boot is not None:
                boot[0].cancel()
                await boot[1].wait()
            await self.destroy_vm(capsule_id)
            await self.set_status(capsule_id, Status.STOPPED, only_from=(Status.STOPPING,),
                                  event=Happened("capsule.destroy"))
        finally:
            self._destroying.discard(capsule_id)

    async def destroy_vm(self, capsule_id: str) -> None:
        """Stop the VM (if any) and remove the capsule's files; errors are logged, not raised."""
        self.agents.forget(capsule_id)
        driver = self.machines.driver
        if driver is not None:
            try:
                await driver.destroy(capsule_id)
            except VmNotFound:
                pass
            except DriverError:
                log.warning("could not destroy the VM", exc_info=True, extra={"capsule_id": capsule_id})
        await trio.to_thread.run_sync(remove_dir, self.capsule_dir(capsule_id))


class IdentityPush:
    """An identity push started ahead of the boot task (at a spare's claim): its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.steps: list[Any] | None = None
        self.error: Exception | None = None


@dataclass
class Claim:
    """A spare taken by a create in flight, and its identity push (None: its agent was not
    connected; the boot connects and pushes)."""

    capsule_id: str
    push: IdentityPush | None
    used: bool = False
    """Its record was written: the capsule is this spare's from then on."""


class Steps:
    """Where a create's time went: milliseconds from the previous mark to each named one
    (logged with ``capsule running``; ``benchmarks/capsules.py`` prints them)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round(self.ms.get(name, 0.0) + (now - self._last) * 1000, 1)
        self._last = now


def _make_dir(directory: Path) -> None:
    # QEMU runs as an unprivileged user: the capsule's directory must be searchable.
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)


def remove_dir(directory: Path) -> None:
    """Remove a capsule's (or a spare's) directory and everything in it."""
    shutil.rmtree(directory, ignore_errors=True)
