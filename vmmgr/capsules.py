"""Capsules: records, the life of their VMs, and the operations on them.

One :class:`Capsules` per vmmgr process answers the capsule messages of
:mod:`dovecote.bus.messages.capsules`. The state of record is the
``capsules`` table; the VM is whatever the driver runs (libvirt owns it, so
a crash of vmmgr leaves it running, see :mod:`dovecote.vmmgr.reconcile`).

Life of a capsule (every change is one guarded ``UPDATE`` and one
``capsule.state.changed`` event)::

    create ──> starting ──boot ok──> running ──destroy──> stopping ──> stopped
                  │                                          ▲
                  └──boot failed──> error ──destroy──────────┘
    (reconcile at start) live record without a VM ──> missing

Create checks the team's caps under a per-team advisory lock, inserts the
row as ``starting`` and answers at once; the boot runs as a task in the
service nursery: driver.create, wait for the guest agent (ping), push a
fresh identity (hostname, machine id, RNG seed, clock), then ``running``.
A boot is cancelled by a destroy that arrives meanwhile.

Operations talk to the guest agent through :class:`AgentPool`: one
connection per running capsule, opened on first use and reopened when it
broke. Agent refusals become the API's errors (``not_found`` 404,
``already_exists`` 409, ``too_large`` 413...); a lost agent is 502.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import trio

from dovecote.bus.messages import capsules as m
from dovecote.bus.messages import events as ev
from dovecote.bus.messages import hosts as h
from dovecote.bus.messages.common import Principal
from dovecote.libs.db import Connection, Database
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.vmmgr import disks, placement
from dovecote.vmmgr.driver import Driver, DriverError, VmNotFound, VmSpec
from dovecote.vmmgr.guest import AgentClient, open_agent
from dovecote.vmmgr.guest import errors as ge
from dovecote.vmmgr.images import GuestImage
from dovecote.vmmgr.templates import MINIMAL, TemplateFiles

log = get_logger("dovecote.vmmgr.capsules")

Publish = Callable[[str, Any], Awaitable[None]]
Request = Callable[..., Awaitable[Any]]
T = TypeVar("T")

NOT_FOUND = ServiceError(404, "not_found", "capsule not found")
FINAL_STATUSES = ("stopped", "missing", "error")
ON_HOST = (*placement.LIVE_STATUSES, "paused", "hibernated")
"""Statuses of a capsule whose VM or saved state is on its host."""
MAX_EXEC_TIMEOUT_S = 3600
FORWARD_TIMEOUT_S = 10.0
EVENT_QUEUE = 10_000
DRIVER_WAIT_S = 10.0
"""How long an operation on a running capsule waits for a restarting vmmgr's driver."""
"""How long a create forwarded to another host may take to be accepted there."""


def new_capsule_id() -> str:
    """``cap-`` and 16 hex digits (a valid libvirt domain suffix)."""
    return "cap-" + secrets.token_hex(8)


def iso(value: datetime | None) -> str | None:
    """RFC 3339 text of a timestamp (UTC, ``Z``), or None."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def to_capsule(row: dict[str, Any]) -> m.Capsule:
    """The API's ``Capsule`` of a ``capsules`` row."""
    metadata = row.get("metadata") or {}
    return m.Capsule(
        id=row["id"], status=row["status"], template=row["template"], vcpus=row["vcpus"],
        memory_mb=row["memory_mb"], timeout_sec=row["timeout_sec"], guest_ip=row["guest_ip"],
        host_ip="", created_at=iso(row["created_at"]) or "", started_at=iso(row["started_at"]),
        last_active_at=iso(row["last_active_at"]), last_updated=iso(row["updated_at"]) or "",
        metadata={str(k): str(v) for k, v in metadata.items()} or None,
        disk_size_mb=row["disk_size_mb"], disk_used_mb=row.get("disk_used_mb"),
        host_unreachable_since=iso(row.get("host_unreachable_since")))


def event_actor(actor: Principal | None) -> ev.EventActor:
    """Who an event names: an API key, a user (session), else the system (hosts, vmmgr itself)."""
    if actor is not None and actor.auth_type == "api_key":
        return ev.EventActor(type="api_key", id=actor.api_key_id, name=actor.api_key_name)
    if actor is not None and actor.auth_type == "session":
        return ev.EventActor(type="user", id=actor.user_id, name=actor.name or actor.email)
    return ev.EventActor(type="system")


def reply_of(row: dict[str, Any]) -> m.CapsuleReply:
    return m.CapsuleReply(capsule=to_capsule(row), host_id=row["host_id"], team_id=row["team_id"])


# -- the hypervisor side, once ready -------------------------------------------


class Machines:
    """The driver and guest image of this host, and how far their set-up got.

    ``status`` is what ``/healthz`` shows as the ``image`` detail:
    ``disabled`` (no driver configured), ``building``, ``ready`` or
    ``failed: ...``.
    """

    def __init__(self) -> None:
        self.driver: Driver | None = None
        self.image: GuestImage | None = None
        self.status = "building"
        self.ready = trio.Event()
        self.base_size_mib: int | None = None
        self.isolation_error: str | None = None
        """Why capsules would not be isolated from the host (the guard failed), or None."""

    def set_ready(self, driver: Driver, image: GuestImage, base_size_mib: int | None = None) -> None:
        self.driver, self.image, self.base_size_mib = driver, image, base_size_mib
        self.status = "ready"
        self.ready.set()

    def require(self) -> tuple[Driver, GuestImage]:
        """The driver and image, or 503 saying why there are none yet."""
        if self.driver is not None and self.image is not None:
            return self.driver, self.image
        if self.status.startswith("disabled"):
            raise ServiceError(503, "vm_driver_disabled",
                               f"this host runs no VM driver ({self.status}; "
                               "set DOVECOTE_VM_DRIVER=libvirt)")
        if self.status.startswith("failed"):
            raise ServiceError(503, "vm_unavailable", f"VMs are unavailable on this host: {self.status}")
        raise ServiceError(503, "image_not_ready",
                           "the guest image is still being built on this host; retry in a minute",
                           retry_after=30)

    async def require_soon(self, wait_s: float = DRIVER_WAIT_S) -> tuple[Driver, GuestImage]:
        """:meth:`require`, after waiting (at most ``wait_s``) for a driver that is connecting.

        A vmmgr that was just restarted serves the bus at once and connects its
        driver a second or two later (the image is cached): an operation on a
        running capsule waits for it instead of being refused ``image_not_ready``.
        """
        if self.driver is None and not self.status.startswith(("disabled", "failed")):
            with trio.move_on_after(wait_s):
                await self.ready.wait()
        return self.require()

    def require_isolation(self) -> None:
        """Refuse to run a capsule's guest when the network guard is not in place (fail closed)."""
        if self.isolation_error is not None:
            raise ServiceError(503, "isolation_unavailable",
                               "capsules cannot be isolated from this host's network: "
                               f"{self.isolation_error} (fix it, or set DOVECOTE_VM_NETGUARD=false "
                               "to run capsules without the guard)")


# -- guest agent connections ---------------------------------------------------


class AgentPool:
    """One live :class:`AgentClient` per capsule, each held open by a task in ``nursery``."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._clients: dict[str, AgentClient] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._locks: dict[str, trio.Lock] = {}

    def __len__(self) -> int:
        return len(self._clients)

    async def get(self, capsule_id: str, socket_path: str, *,
                  connect_timeout: float = 10.0) -> AgentClient:
        """The capsule's connected client, connecting (again) when there is none."""
        lock = self._locks.setdefault(capsule_id, trio.Lock())
        async with lock:
            client = self._clients.get(capsule_id)
            if client is not None and client.connected:
                return client
            self.close(capsule_id)
            return cast(AgentClient, await self._nursery.start(
                self._hold, capsule_id, socket_path, connect_timeout))

    def close(self, capsule_id: str) -> None:
        """Drop the capsule's connection (the guest's processes keep running)."""
        scope = self._scopes.pop(capsule_id, None)
        self._clients.pop(capsule_id, None)
        if scope is not None:
            scope.cancel()

    def forget(self, capsule_id: str) -> None:
        """Close and forget the capsule entirely (it is gone)."""
        self.close(capsule_id)
        self._locks.pop(capsule_id, None)

    async def _hold(self, capsule_id: str, socket_path: str, connect_timeout: float, *,
                    task_status: trio.TaskStatus[AgentClient] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scopes[capsule_id] = scope
            started = False
            try:
                async with open_agent(socket_path, connect_timeout=connect_timeout) as client:
                    self._clients[capsule_id] = client
                    task_status.started(client)
                    started = True
                    while client.connected:  # noqa: ASYNC110 - the client has no "broken" event
                        await trio.sleep(0.5)
                    log.info("agent connection lost", extra={"capsule_id": capsule_id})
            except Exception:
                if not started:
                    raise  # to the caller of get()
                # Never let one capsule's connection take the service's nursery down.
                log.warning("agent connection failed", exc_info=True, extra={"capsule_id": capsule_id})
            finally:
                if self._scopes.get(capsule_id) is scope:
                    self._scopes.pop(capsule_id, None)
                    self._clients.pop(capsule_id, None)


@asynccontextmanager
async def agent_errors(capsule_id: str) -> AsyncIterator[None]:
    """Turn guest-agent failures into the API's errors."""
    try:
        yield
    except ge.NotFound as exc:
        raise ServiceError(404, "not_found", exc.message) from exc
    except ge.AlreadyExists as exc:
        raise ServiceError(409, "already_exists", exc.message) from exc
    except ge.PermissionDenied as exc:
        raise ServiceError(403, "permission_denied", exc.message) from exc
    except ge.TooLarge as exc:
        raise ServiceError(413, "too_large", exc.message) from exc
    except ge.AgentRequestError as exc:
        if exc.code in ("is_a_directory", "not_a_directory", "invalid_path", "invalid_argument"):
            raise ServiceError(400, exc.code, exc.message) from exc
        if exc.code == "not_running":
            raise ServiceError(409, "not_running", exc.message) from exc
        raise ServiceError(502, "agent_error", f"the capsule's agent failed: {exc.message}") from exc
    except ge.AgentTimeout as exc:
        raise ServiceError(504, "agent_timeout", f"the capsule's agent did not answer: {exc}") from exc
    except ge.AgentError as exc:
        log.warning("agent unavailable", extra={"capsule_id": capsule_id, "error": str(exc)})
        raise ServiceError(502, "agent_unavailable",
                           "the capsule's agent cannot be reached; retry shortly") from exc


# -- configuration the handlers need --------------------------------------------


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


# -- the handlers ----------------------------------------------------------------


class Capsules:
    """The capsule handlers of one vmmgr."""

    def __init__(self, *, db: Database, publish: Publish, machines: Machines,
                 settings: CapsuleSettings, nursery: trio.Nursery, request: Request | None = None) -> None:
        self.db = db
        self.publish = publish
        self.request = request
        self.minimal: TemplateFiles | None = None
        """The built-in template once made (until then ``minimal`` capsules cold-boot)."""
        self.pool: Any = None
        """The :class:`~dovecote.vmmgr.pool.WarmPool` of restored, paused spares, if any."""
        self._events: trio.MemorySendChannel[tuple[str, ev.LifecycleEvent]] | None = None
        self._events_closed = False
        self._events_done = trio.Event()
        self.vm_locks: dict[str, trio.Lock] = {}
        """Held while a capsule's VM is saved, restored or frozen."""
        self.machines = machines
        self.settings = settings
        self.host_id = settings.host_id
        self.nursery = nursery
        self.agents = AgentPool(nursery)
        self._boots: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self._starting: set[str] = set()
        """Created here, boot task not started yet (see :meth:`busy`)."""
        self._destroying: set[str] = set()

    def register(self, handle: Callable[[type, Any], None]) -> None:
        handle(m.CreateCapsule, self.create)
        handle(m.ListCapsules, self.list)
        handle(m.LookupCapsule, self.lookup)
        handle(m.DestroyCapsule, self.destroy)
        handle(m.ExecCommand, self.exec)
        handle(m.ListProcesses, self.list_processes)
        handle(m.KillProcess, self.kill_process)
        handle(m.PingCapsule, self.ping)
        handle(m.WriteFile, self.write_file)
        handle(m.ReadFile, self.read_file)
        handle(m.ListDir, self.list_dir)
        handle(m.MakeDir, self.make_dir)
        handle(m.RemovePath, self.remove_path)

    # -- records ---------------------------------------------------------------

    async def set_status(self, capsule_id: str, new: str, *, only_from: tuple[str, ...] | None = None,
                         error: str | None = None, metadata: dict[str, str] | None = None,
                         pause_reason: str | None = None) -> dict[str, Any] | None:
        """Move a capsule to ``new`` (if its status is one of ``only_from``) and publish it.

        A move to ``pausing`` records ``pause_reason`` (``user``, ``ttl_expired``,
        ``shutdown``), kept while the capsule is paused. Returns the updated row,
        or None when the guard did not match.
        """
        row = await self.db.fetchone(
            "WITH old AS (SELECT id, status FROM capsules WHERE id = %(id)s FOR UPDATE) "
            "UPDATE capsules c SET status = %(new)s, updated_at = now(), "
            "  error = CASE WHEN %(error)s::text IS NOT NULL THEN %(error)s::text "
            "               WHEN %(new)s IN ('running', 'paused') THEN NULL ELSE c.error END, "
            "  metadata = c.metadata || %(meta)s::jsonb, "
            "  pause_reason = CASE WHEN %(new)s = 'pausing' THEN %(reason)s::text "
            "                      ELSE c.pause_reason END, "
            "  started_at = CASE WHEN %(new)s = 'running' THEN coalesce(c.started_at, now()) "
            "                    ELSE c.started_at END, "
            "  last_active_at = CASE WHEN %(new)s = 'running' AND old.status <> 'running' "
            "                        THEN now() ELSE c.last_active_at END, "
            "  stopped_at = CASE WHEN %(new)s IN ('stopped', 'missing', 'error') THEN now() "
            "                    ELSE c.stopped_at END "
            "FROM old WHERE c.id = old.id "
            "  AND (%(from)s::text[] IS NULL OR old.status = ANY(%(from)s::text[])) "
            "RETURNING c.*, old.status AS old_status",
            {"id": capsule_id, "new": new, "error": error, "meta": json.dumps(metadata or {}),
             "reason": pause_reason,
             "from": list(only_from) if only_from is not None else None})
        if row is None:
            return None
        if row["old_status"] != new:
            log.info("capsule status", extra={"capsule_id": capsule_id, "old": row["old_status"],
                                               "new": new, "error": error})
            await self._announce(row, row["old_status"])
        return row

    def emit(self, name: str, row: dict[str, Any], *, actor: Principal | None = None,
             outcome: str | None = "success", error: str | None = None,
             metadata: dict[str, str] | None = None) -> None:
        """Record a lifecycle event about a capsule (in the background; never fails the caller)."""
        if self.request is None:
            return
        event = ev.LifecycleEvent(
            event=name, resource=ev.EventResource(id=row["id"], type="capsule"), actor=event_actor(actor),
            timestamp=ev.now_iso(), outcome=outcome, error=error if outcome == "error" else None,
            metadata=metadata or {}, sandbox=to_capsule(row))
        self.record(row["team_id"], event)

    def record(self, team_id: str, event: ev.LifecycleEvent) -> None:
        """Queue a lifecycle event for the notifier's log; one task records them in order,
        so a reader sees a capsule's events in the order they happened. Never blocks:
        past :data:`EVENT_QUEUE` waiting events, new ones are dropped with a warning."""
        if self.request is None:
            return
        if self._events_closed:
            log.warning("lifecycle event dropped: vmmgr has stopped", extra={"event": event.event})
            return
        if self._events is None:
            send, receive = trio.open_memory_channel[tuple[str, ev.LifecycleEvent]](EVENT_QUEUE)
            self._events = send
            self.nursery.start_soon(self._record_events, receive)
        try:
            self._events.send_nowait((team_id, event))
        except trio.WouldBlock:
            log.warning("lifecycle event dropped: the notifier is behind", extra={"event": event.event})

    async def _record_events(self, receive: trio.MemoryReceiveChannel[tuple[str, ev.LifecycleEvent]]) -> None:
        assert self.request is not None
        try:
            async with receive:
                async for team_id, event in receive:
                    await ev.record_event(self.request, team_id, event)
        finally:
            self._events_done.set()

    async def close_events(self, timeout_s: float) -> None:
        """At stop: record the events still queued (for up to ``timeout_s``), then take no more."""
        self._events_closed = True
        if self._events is None:
            return
        self._events.close()
        with trio.move_on_after(timeout_s):
            await self._events_done.wait()

    async def _announce(self, row: dict[str, Any], old: str | None) -> None:
        event = m.CapsuleStateChanged(
            capsule_id=row["id"], team_id=row["team_id"], host_id=row["host_id"], old_status=old,
            new_status=row["status"], error=row["error"] if row["status"] == "error" else None,
            at=iso(row["updated_at"]) or "")
        try:
            await self.publish(m.CAPSULE_STATE_TOPIC, event)
        except Exception:  # the record is the truth; an event lost on a closing bus is not fatal
            log.warning("could not publish the capsule event", exc_info=True,
                        extra={"capsule_id": row["id"]})
        if old is not None:
            meta = {"from": old, "to": row["status"]}
            if row["status"] == "error" and row["error"]:
                meta["error"] = str(row["error"])[:500]
            self.emit("capsule.state.changed", row, outcome=None, metadata=meta)

    async def _find(self, actor: Principal, capsule_id: str, admin: bool) -> dict[str, Any]:
        """The capsule's row if the caller may see it, else 404 (never 403: no probing)."""
        if admin and not actor.is_admin:
            raise ServiceError(403, "forbidden", "platform admin access required")
        if not capsule_id or len(capsule_id) > 64:
            raise NOT_FOUND
        row = await self.db.fetchone("SELECT * FROM capsules WHERE id = %s", (capsule_id,))
        if row is None or (not admin and row["team_id"] != actor.team_id):
            raise NOT_FOUND
        return row

    def _local(self, row: dict[str, Any]) -> None:
        if row["host_id"] != self.host_id:
            raise ServiceError(503, "wrong_host",
                               f"capsule {row['id']} runs on host {row['host_id']}, not {self.host_id}")

    # -- create, list, lookup --------------------------------------------------

    async def create(self, msg: m.CreateCapsule) -> m.CapsuleReply:
        actor = msg.actor
        if not actor.team_id:
            raise ServiceError(403, "forbidden", "a team is required to create capsules")
        template = await self._template_row(actor, msg.spec.template)
        if template is None:
            # An impossible request is the client's error (400 naming the limit)
            # whatever the hosts' state: checked before placement and the driver.
            placement.normalize_spec(msg.spec, self.settings.limits)
        if template is None and not msg.placed:
            host_id = await self._place(actor, msg.spec)
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
            spec = placement.normalize_spec(msg.spec, self.settings.limits)
        pooled = None
        if template is None and self.pool is not None:
            pooled = self.pool.claim(spec)
        capsule_id = pooled or new_capsule_id()
        settings = self.settings

        def work(conn: Connection) -> dict[str, Any]:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('vmmgr.team:' || %s))", (actor.team_id,))
            team = _usage(conn, "team_id", actor.team_id)
            placement.check_team_caps(team, spec, settings.limits)
            if settings.host_max_capsules or settings.host_max_memory_mb:
                host = _usage(conn, "host_id", self.host_id)
                placement.check_host_capacity(host, spec, max_capsules=settings.host_max_capsules,
                                              max_memory_mb=settings.host_max_memory_mb)
            row = conn.execute(
                "INSERT INTO capsules (id, team_id, created_by, host_id, template, vcpus, memory_mb, "
                "disk_size_mb, timeout_sec, status, metadata) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'starting', %s::jsonb) RETURNING *",
                (capsule_id, actor.team_id, actor.user_id or actor.api_key_id, self.host_id,
                 spec.template, spec.vcpus, spec.memory_mb, spec.disk_size_mb, spec.timeout_sec,
                 json.dumps(spec.metadata or {}))).fetchone()
            assert row is not None
            return dict(row)

        try:
            row = await self.db.transaction(work)
        except BaseException:
            if pooled is not None and self.pool is not None:
                self.pool.give_back(pooled)
            raise
        await self._announce(row, None)
        log.info("capsule created", extra={"capsule_id": capsule_id, "team_id": actor.team_id})
        self.emit("capsule.create", row, actor=actor)
        files = None
        if template is not None:
            files = self.template_files(template)
        elif spec.template == MINIMAL and self.minimal is not None and (
                self.minimal.vcpus, self.minimal.memory_mb) == (spec.vcpus, spec.memory_mb):
            files = self.minimal
        self._starting.add(capsule_id)
        self.nursery.start_soon(self._boot, row, files, pooled is not None)
        return reply_of(row)

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
        rows = await self.db.fetchall(
            "SELECT host_id, count(*) AS n, coalesce(sum(vcpus), 0) AS vcpus, "
            "coalesce(sum(memory_mb), 0) AS memory FROM capsules WHERE status = ANY(%s) "
            "GROUP BY host_id", (list(placement.LIVE_STATUSES),))
        usage = {r["host_id"]: placement.Usage(capsules=int(r["n"]), vcpus=int(r["vcpus"]),
                                               memory_mb=int(r["memory"])) for r in rows}
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

    async def _template_row(self, actor: Principal, name: str) -> dict[str, Any] | None:
        """The team's (or a platform) snapshot template called ``name``; None for ``minimal``."""
        if name == MINIMAL or not name:
            return None
        row = await self.db.fetchone(
            "SELECT * FROM templates WHERE name = %s AND team_id IN (%s, '') AND status = 'ready' "
            "ORDER BY team_id DESC LIMIT 1", (name, actor.team_id))
        if row is None:
            raise ServiceError(404, "template_not_found", f"template {name!r} not found")
        return row

    def template_files(self, row: dict[str, Any]) -> TemplateFiles:
        if self.settings.template_dir is None:
            raise ServiceError(503, "templates_unavailable", "this host keeps no templates")
        return TemplateFiles(directory=self.settings.template_dir / row["id"], vcpus=row["vcpus"],
                             memory_mb=row["memory_mb"])

    async def list(self, msg: m.ListCapsules) -> m.CapsuleList:
        if msg.all_teams:
            if not msg.actor.is_admin:
                raise ServiceError(403, "forbidden", "platform admin access required")
            rows = await self.db.fetchall("SELECT * FROM capsules ORDER BY created_at DESC LIMIT 1000")
        else:
            rows = await self.db.fetchall(
                "SELECT * FROM capsules WHERE team_id = %s ORDER BY created_at DESC LIMIT 1000",
                (msg.actor.team_id,))
        return m.CapsuleList(capsules=[to_capsule(r) for r in rows])

    async def lookup(self, msg: m.LookupCapsule) -> m.CapsuleReply:
        row = await self._find(msg.actor, msg.capsule_id, msg.admin)
        silent_since = row.get("host_unreachable_since")
        if msg.operation and silent_since is not None:
            raise ServiceError(503, "host_unavailable",
                               f"capsule {row['id']} runs on host {row['host_id']}, which has not answered "
                               f"since {iso(silent_since)}; retry when it is back", retry_after=30)
        return reply_of(row)

    # -- hosts that go quiet -------------------------------------------------------

    async def mark_host_unreachable(self, host_id: str) -> list[str]:
        """A host went silent: its live capsules keep their status, marked unreachable."""
        rows = await self.db.fetchall(
            "UPDATE capsules SET host_unreachable_since = now(), updated_at = now() "
            "WHERE host_id = %s AND status = ANY(%s) AND host_unreachable_since IS NULL RETURNING id",
            (host_id, list(ON_HOST)))
        return [r["id"] for r in rows]

    async def mark_host_reachable(self, host_id: str, *, every_status: bool = False) -> list[str]:
        """A host answers again: its capsules are reachable. ``missing`` ones keep the marker
        for the host's own reconcile, which re-adopts them and then clears every marker."""
        rows = await self.db.fetchall(
            "UPDATE capsules SET host_unreachable_since = NULL, updated_at = now() "
            "WHERE host_id = %s AND (%s OR status = ANY(%s)) AND host_unreachable_since IS NOT NULL "
            "RETURNING id", (host_id, every_status, list(ON_HOST)))
        return [r["id"] for r in rows]

    async def lose_silent_capsules(self, lost_after_s: float) -> list[str]:
        """Capsules whose host has been silent for ``lost_after_s``: ``missing`` (marker kept)."""
        rows = await self.db.fetchall(
            "SELECT id FROM capsules WHERE status = ANY(%s) "
            "AND host_unreachable_since < now() - make_interval(secs => %s)",
            (list(ON_HOST), lost_after_s))
        lost = []
        for row in rows:
            if await self.set_status(row["id"], "missing", only_from=ON_HOST,
                                     error=f"host unreachable for more than {lost_after_s:.0f} s"):
                lost.append(row["id"])
        return lost

    # -- boot --------------------------------------------------------------------

    def capsule_dir(self, capsule_id: str) -> Path:
        return self.settings.run_dir / capsule_id

    async def _boot(self, row: dict[str, Any], template: TemplateFiles | None = None,
                    pooled: bool = False) -> None:
        """Run a ``starting`` capsule's VM until its agent answers, then mark it ``running``.

        With ``template`` the VM is restored from it instead of booted; ``pooled``: the
        VM is a running spare of :class:`~dovecote.vmmgr.pool.WarmPool`, only greeted.
        """
        capsule_id = row["id"]
        done = trio.Event()
        scope = trio.CancelScope()
        self._boots[capsule_id] = (scope, done)
        began = time.monotonic()
        try:
            with scope:
                try:
                    with trio.fail_after(self.settings.boot_timeout_s):
                        metadata = await self._start_vm(row, template, pooled)
                except BaseException as exc:
                    if isinstance(exc, trio.Cancelled):
                        raise
                    text = "boot timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                    log.warning("capsule boot failed", exc_info=not isinstance(exc, ServiceError),
                                extra={"capsule_id": capsule_id, "error": text})
                    if await self.set_status(capsule_id, "error", only_from=("starting",),
                                             error=text[:2000] or type(exc).__name__):
                        await self._destroy_vm(capsule_id)
                    return
                if await self.set_status(capsule_id, "running", only_from=("starting",),
                                         metadata=metadata) is None:
                    return  # destroyed meanwhile
                log.info("capsule running", extra={"capsule_id": capsule_id,
                                                   "boot_s": round(time.monotonic() - began, 2)})
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

    async def _start_vm(self, row: dict[str, Any], template: TemplateFiles | None = None,
                        pooled: bool = False) -> dict[str, str]:
        driver, image = self.machines.require()
        capsule_id = row["id"]
        if pooled:  # a warm spare: restored, running, its agent connected
            socket_path = await driver.agent_socket(capsule_id)
        else:
            spec = await self.vm_spec(capsule_id, vcpus=row["vcpus"], memory_mb=row["memory_mb"],
                                      disk_size_mb=row["disk_size_mb"], template=template)
            socket_path = (await driver.create(spec)).agent_socket_path
        return await self._greet(capsule_id, str(socket_path), image,
                                 connect_timeout=self.settings.boot_timeout_s)

    async def _greet(self, capsule_id: str, socket_path: str, image: GuestImage | None, *,
                     connect_timeout: float) -> dict[str, str]:
        """Wait for the agent, push a fresh identity; returns version metadata."""
        client = await self.agents.get(capsule_id, socket_path, connect_timeout=connect_timeout)
        steps = await client.set_identity(
            hostname=capsule_id, machine_id=uuid.uuid4().hex, rng_seed=os.urandom(64),
            clock_unix_ns=time.time_ns(), env={"DOVECOTE_CAPSULE_ID": capsule_id},
            timeout=self.settings.agent_timeout_s)
        failed = [f"{s.step}: {s.detail}" for s in steps if s.status == "error"]
        if failed:
            log.warning("identity steps failed", extra={"capsule_id": capsule_id, "steps": failed})
        try:  # the real size of its root filesystem (vmmgr/disks.py)
            await disks.refresh(self.db, capsule_id, client)
        except ge.AgentError as exc:
            log.warning("disk usage unknown", extra={"capsule_id": capsule_id, "error": str(exc)})
        metadata: dict[str, str] = {}
        if client.pong is not None:
            metadata["agent_version"] = client.pong.agent_version
        if image is not None:
            metadata["kernel_version"] = image.kernel_version
        return metadata

    async def reconnect(self, capsule_id: str, socket_path: str) -> None:
        """After a restore of the capsule's own VM: reconnect the agent and set its clock."""
        self.agents.close(capsule_id)
        client = await self.agents.get(capsule_id, socket_path,
                                       connect_timeout=self.settings.boot_timeout_s)
        await client.set_identity(clock_unix_ns=time.time_ns(), timeout=self.settings.agent_timeout_s)

    async def resume_boot(self, row: dict[str, Any], socket_path: str) -> None:
        """Finish the boot of a capsule whose VM runs but whose boot was interrupted (reconcile)."""
        capsule_id = row["id"]
        try:
            with trio.fail_after(self.settings.boot_timeout_s):
                metadata = await self._greet(capsule_id, socket_path, self.machines.image,
                                             connect_timeout=self.settings.boot_timeout_s)
        except (ge.AgentError, trio.TooSlowError, OSError) as exc:
            if await self.set_status(capsule_id, "error", only_from=("starting",), error=str(exc)):
                await self._destroy_vm(capsule_id)
            return
        await self.set_status(capsule_id, "running", only_from=("starting",), metadata=metadata)

    # -- destroy -----------------------------------------------------------------

    async def destroy(self, msg: m.DestroyCapsule) -> m.CapsuleReply:
        row = await self._find(msg.actor, msg.capsule_id, msg.admin)
        self._local(row)
        if row["status"] in ("stopped", "stopping"):
            return reply_of(row)
        stopping = await self.set_status(row["id"], "stopping",
                                         only_from=tuple(s for s in m.STATUSES
                                                         if s not in ("stopped", "stopping")))
        if stopping is None:  # raced with another destroy
            return reply_of(await self._find(msg.actor, msg.capsule_id, msg.admin))
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
            await self._destroy_vm(capsule_id)
            row = await self.set_status(capsule_id, "stopped", only_from=("stopping",))
            if row is not None:
                self.emit("capsule.destroy", row)
        finally:
            self._destroying.discard(capsule_id)

    async def _destroy_vm(self, capsule_id: str) -> None:
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
        await trio.to_thread.run_sync(_remove_dir, self.capsule_dir(capsule_id))

    # -- operations through the agent ----------------------------------------------

    async def _agent(self, msg: m.CapsuleOp) -> tuple[dict[str, Any], AgentClient]:
        row = await self._find(msg.actor, msg.capsule_id, msg.admin)
        if row["status"] != "running":
            raise ServiceError(409, "not_running",
                               f"capsule {row['id']} is {row['status']}, not running")
        self._local(row)
        driver, _ = await self.machines.require_soon()
        try:
            socket_path = await driver.agent_socket(row["id"])
        except VmNotFound:
            await self.set_status(row["id"], "missing", only_from=("running",))
            raise ServiceError(409, "not_running", f"capsule {row['id']}'s VM is gone") from None
        except DriverError as exc:
            raise ServiceError(502, "driver_error", str(exc)) from exc
        lock = self.vm_locks.get(row["id"])
        if lock is not None and lock.locked():  # a snapshot in progress: wait for the VM
            async with lock:
                pass
        async with agent_errors(row["id"]):
            client = await self.agents.get(row["id"], str(socket_path),
                                           connect_timeout=self.settings.agent_timeout_s)
        await self._touch(row["id"])
        return row, client

    async def _touch(self, capsule_id: str) -> None:
        await self.db.execute("UPDATE capsules SET last_active_at = now() WHERE id = %s", (capsule_id,))

    async def exec(self, msg: m.ExecCommand) -> m.ExecReply:
        if not msg.cmd:
            raise ServiceError(400, "invalid_request", "cmd is required")
        if not 0 < msg.timeout_sec <= MAX_EXEC_TIMEOUT_S:
            raise ServiceError(400, "invalid_request",
                               f"timeout_sec must be between 1 and {MAX_EXEC_TIMEOUT_S}")
        row, client = await self._agent(msg)
        shown = " ".join([msg.cmd, *(msg.args or [])])
        async with agent_errors(row["id"]):
            if msg.background:
                started = await client.start_process(msg.cmd, args=msg.args, env=msg.envs,
                                                     cwd=msg.cwd, user=msg.user, tag=msg.tag or None)
                return m.ExecReply(started=m.BackgroundExecResponse(
                    sandbox_id=row["id"], cmd=shown, pid=started.pid, tag=started.tag))
            result = await client.exec(msg.cmd, args=msg.args, env=msg.envs, cwd=msg.cwd,
                                       user=msg.user, timeout=float(msg.timeout_sec))
        await self._touch(row["id"])
        if result.timed_out:  # killed at its deadline: no partial result passed off as a success
            raise ServiceError(408, "timeout", f"{shown[:200]!r} did not finish within its "
                               f"timeout_sec of {msg.timeout_sec} s and was killed")
        return m.ExecReply(result=m.ExecResponse(
            sandbox_id=row["id"], cmd=shown, stdout=result.stdout, stderr=result.stderr,
            exit_code=result.exit_code, duration_ms=result.duration_ms, encoding=result.encoding))

    async def list_processes(self, msg: m.ListProcesses) -> m.ProcessesReply:
        row, client = await self._agent(msg)
        async with agent_errors(row["id"]):
            processes = await client.list_processes(include_system=True)
        entries = [m.ProcessEntry(pid=p.pid, tag=p.tag, cmd=p.cmd, args=list(p.args))
                   for p in processes if p.running]
        return m.ProcessesReply(body=m.ProcessListResponse(processes=entries))

    async def kill_process(self, msg: m.KillProcess) -> m.CapsuleDone:
        if not msg.selector or len(msg.selector) > 128:
            raise ServiceError(400, "invalid_request", "invalid process selector")
        row, client = await self._agent(msg)
        signal = cast(Literal["SIGKILL", "SIGTERM"], msg.signal)
        async with agent_errors(row["id"]):
            killed = await client.kill(msg.selector, signal)
        if not killed.delivered:
            raise ServiceError(404, "not_found", f"process {msg.selector} is not running")
        return m.CapsuleDone()

    async def ping(self, msg: m.PingCapsule) -> m.CapsuleDone:
        row = await self._find(msg.actor, msg.capsule_id, msg.admin)
        if row["status"] != "running":
            raise ServiceError(409, "not_running", f"capsule {row['id']} is {row['status']}, not running")
        await self._touch(row["id"])
        return m.CapsuleDone()

    async def write_file(self, msg: m.WriteFile) -> m.CapsuleDone:
        row, client = await self._agent(msg)
        async with agent_errors(row["id"]):
            await client.write_file(_path(msg.path), msg.data)
        return m.CapsuleDone()

    async def read_file(self, msg: m.ReadFile) -> m.FileContent:
        row, client = await self._agent(msg)
        async with agent_errors(row["id"]):
            data = await client.read_file_bytes(_path(msg.path))
        return m.FileContent(data=data)

    async def list_dir(self, msg: m.ListDir) -> m.ListDirReply:
        row, client = await self._agent(msg)
        async with agent_errors(row["id"]):
            listing = await client.list_dir(_path(msg.path), msg.depth)
        return m.ListDirReply(body=m.ListDirResponse(entries=[_entry(e) for e in listing.entries]))

    async def make_dir(self, msg: m.MakeDir) -> m.MakeDirReply:
        row, client = await self._agent(msg)
        async with agent_errors(row["id"]):
            entry = await client.mkdir(_path(msg.path))
        return m.MakeDirReply(body=m.MakeDirResponse(entry=_entry(entry)))

    async def remove_path(self, msg: m.RemovePath) -> m.CapsuleDone:
        row, client = await self._agent(msg)
        async with agent_errors(row["id"]):
            await client.remove(_path(msg.path))
        return m.CapsuleDone()

    def statistics(self) -> dict[str, int]:
        return {"agent_connections": len(self.agents), "booting": len(self._boots),
                "spares": len(self.pool) if self.pool is not None else 0}


def _usage(conn: Connection, column: Literal["team_id", "host_id"], value: str) -> placement.Usage:
    query = ("SELECT count(*) AS n, coalesce(sum(vcpus), 0) AS vcpus, "
             "coalesce(sum(memory_mb), 0) AS memory FROM capsules "
             "WHERE team_id = %s AND status = ANY(%s)") if column == "team_id" else (
             "SELECT count(*) AS n, coalesce(sum(vcpus), 0) AS vcpus, "
             "coalesce(sum(memory_mb), 0) AS memory FROM capsules "
             "WHERE host_id = %s AND status = ANY(%s)")
    row = conn.execute(query, (value, list(placement.LIVE_STATUSES))).fetchone()
    assert row is not None
    return placement.Usage(capsules=int(row["n"]), vcpus=int(row["vcpus"]), memory_mb=int(row["memory"]))


def _path(path: str) -> str:
    if not path or not path.startswith("/") or "\x00" in path or len(path) > 4096:
        raise ServiceError(400, "invalid_path", "path must be an absolute path inside the capsule")
    return path


def _entry(entry: Any) -> m.FileEntry:
    return m.FileEntry(name=entry.name, path=entry.path, type=entry.type, size=entry.size,
                       mode=entry.mode, permissions=entry.permissions, owner=entry.owner,
                       group=entry.group, modified_at=entry.modified_at,
                       symlink_target=entry.symlink_target)


def _make_dir(directory: Path) -> None:
    # QEMU runs as an unprivileged user: the capsule's directory must be searchable.
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)


def _remove_dir(directory: Path) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
