"""Pause, resume, live snapshots into templates, and the inactivity TTL.

Pause and resume (``POST /v1/capsules/{id}/pause|resume``)::

    running ──pause──> pausing ──saved──> paused ──resume──> resuming ──restored──> running
                          └──save failed──> running     └──restore failed──> paused (error kept)

Pause saves the VM's RAM and device state to ``<capsule dir>/memory.sav``
(libvirt's managed save format) and frees the VM; the disk overlay stays.
Resume restores it on the same host under the same name, so the guest's
processes, files, clock offset and network identity are those it had; the
host then reconnects to the agent and sets the guest clock. The TTL pause
(``timeout_sec``) takes the same path with ``reason: ttl_expired``.

A live snapshot (``POST /v1/snapshots``) makes a team template from a running
capsule (see :mod:`dovecote.vmmgr.templates` for what a template is):

1. save the VM (its RAM and device state) to a scratch file; the VM stops;
2. copy its disk into the template (``qemu-img convert`` over the base image);
3. restore the saved VM with its RAM written through to the template's
   ``memory`` file, paused, and freeze it: the device state goes to ``state``;
4. destroy that VM and restore the saved one again, in anonymous memory: the
   source runs on from where it was, on its own overlay.

The source is unavailable for the few seconds this takes (operations wait
for it); two capsules created from the template share no RAM, disk or
identity (each gets its own overlay, a private copy-on-write map of the
RAM file, and a fresh machine id, RNG seed and clock pushed after restore).
"""

from __future__ import annotations

import re
import secrets
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import trio

from dovecote.bus.messages import capsules as m
from dovecote.bus.messages import events as ev
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import now_rfc3339, rfc3339
from dovecote.vmmgr import mapped
from dovecote.vmmgr.capsule_events import Happened
from dovecote.vmmgr.capsule_store import NOT_FOUND, Status, reply_of
from dovecote.vmmgr.capsules import Capsules, event_actor
from dovecote.vmmgr.driver import DriverError
from dovecote.vmmgr.templates import MINIMAL, disk_usage, flatten_disk

log = get_logger("dovecote.vmmgr.snapshots")

SAVE_FILE = "memory.sav"
TEMPLATE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
TTL_SCAN_INTERVAL_S = 5.0


class Snapshots:
    """The pause/resume/snapshot handlers and the TTL watcher of one vmmgr."""

    def __init__(self, capsules: Capsules) -> None:
        self.capsules = capsules
        self.db = capsules.db
        capsules.finish_pause = self.finish_pause

    def register(self, handle: Callable[[type, Any], None]) -> None:
        handle(m.PauseCapsule, self.pause)
        handle(m.ResumeCapsule, self.resume)
        handle(m.CreateSnapshot, self.snapshot)
        handle(m.ListTemplates, self.list_templates)
        handle(m.DeleteTemplate, self.delete_template)

    def _lock(self, capsule_id: str) -> trio.Lock:
        return self.capsules.vm_locks.setdefault(capsule_id, trio.Lock())

    # -- pause / resume ----------------------------------------------------------

    async def pause(self, msg: m.PauseCapsule) -> m.CapsuleReply:
        return await self._transition(msg, done=(Status.PAUSING, Status.PAUSED), to=Status.PAUSING,
                                      only_from=Status.RUNNING,
                                      refusal="not_running", pause_reason="user",
                                      then=lambda cid: self.finish_pause(cid, "user", msg.actor))

    async def _transition(self, msg: m.CapsuleOp, *, done: tuple[str, ...], to: str, only_from: str,
                          refusal: str, then: Callable[[str], Any],
                          pause_reason: str | None = None) -> m.CapsuleReply:
        """Move a capsule of this host ``only_from`` → ``to`` and run ``then`` in the background;
        a capsule already in one of ``done`` is answered as it is, any other is 409 ``refusal``."""
        caps = self.capsules
        row = await caps.find(msg.actor, msg.capsule_id, msg.admin)
        caps.require_local(row)
        if row["status"] in done:
            return reply_of(row)
        moved = await caps.set_status(row["id"], to, only_from=(only_from,), pause_reason=pause_reason)
        if moved is None:
            raise ServiceError(409, refusal, f"capsule {row['id']} is {row['status']}, not {only_from}")
        caps.nursery.start_soon(then, row["id"])
        return reply_of(moved)

    async def finish_pause(self, capsule_id: str, reason: str, actor: Any = None) -> bool:
        """``pausing`` → VM saved and freed → ``paused``; a failed save leaves it ``running``."""
        caps = self.capsules
        driver, _ = caps.machines.require()
        path = caps.capsule_dir(capsule_id) / SAVE_FILE
        began = time.monotonic()
        async with self._lock(capsule_id):
            caps.agents.close(capsule_id)
            try:
                # Through the capsule's RAM file when it has one, else libvirt's save.
                by_file = await mapped.pause(driver, capsule_id, path.parent, release=False)
                if not by_file:
                    await driver.save(capsule_id, path)
            except DriverError as exc:
                log.warning("pause failed", extra={"capsule_id": capsule_id, "error": str(exc)})
                failed = Happened("capsule.pause", actor, outcome="error", error=str(exc)[:500],
                                  metadata={"reason": reason})
                await caps.set_status(capsule_id, "running", only_from=("pausing",), event=failed)
                return False
            await caps.set_status(capsule_id, "paused", only_from=("pausing",),
                                  event=Happened("capsule.pause", actor, metadata={"reason": reason}))
            if by_file:
                # Paused since the commit; the VM is released after the status is
                # written, still under the capsule's lock (a resume waits, reconcile
                # skips it; after a crash the driver's settle destroys the VM).
                with trio.CancelScope(shield=True):
                    await mapped.release(driver, capsule_id)
        log.info("capsule paused", extra={"capsule_id": capsule_id, "reason": reason,
                                          "pause_s": round(time.monotonic() - began, 3)})
        return True

    async def resume(self, msg: m.ResumeCapsule) -> m.CapsuleReply:
        self.capsules.machines.require_isolation()
        return await self._transition(msg, done=(Status.RESUMING, Status.RUNNING), to=Status.RESUMING,
                                      only_from=Status.PAUSED,
                                      refusal="not_paused",
                                      then=lambda cid: self.finish_resume(cid, msg.actor))

    async def finish_resume(self, capsule_id: str, actor: Any = None) -> bool:
        """``resuming`` → VM restored, agent reconnected → ``running``; on failure back to ``paused``."""
        caps = self.capsules
        driver, _ = caps.machines.require()
        path = caps.capsule_dir(capsule_id) / SAVE_FILE
        began = time.monotonic()
        try:
            async with self._lock(capsule_id):
                with trio.fail_after(caps.settings.boot_timeout_s):
                    # A libvirt save image (a first pause) resumes with its RAM moved into a
                    # file of the capsule's own, so its next pause is through that file.
                    handle = await mapped.restore(driver, path.parent) or await driver.restore(
                        path, memory_file=mapped.own_ram_file(driver, path.parent))
                    await caps.reconnect(capsule_id, str(handle.agent_socket_path))
        except Exception as exc:
            text = "resume timed out" if isinstance(exc, trio.TooSlowError) else str(exc) or repr(exc)
            log.warning("resume failed", extra={"capsule_id": capsule_id, "error": text})
            caps.agents.close(capsule_id)
            with trio.CancelScope(shield=True):
                try:  # a VM resumed through its RAM file is paused again, not destroyed
                    await mapped.abandon_resume(driver, capsule_id, path.parent)
                except DriverError:
                    pass
                failed = Happened("capsule.resume", actor, outcome="error", error=text[:500])
                await caps.set_status(capsule_id, "paused", only_from=("resuming",),
                                      error=f"resume failed: {text}"[:2000], event=failed)
            return False
        await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
        await caps.set_status(capsule_id, "running", only_from=("resuming",),
                              event=Happened("capsule.resume", actor))
        log.info("capsule resumed", extra={"capsule_id": capsule_id,
                                           "resume_s": round(time.monotonic() - began, 3)})
        return True

    # -- TTL -----------------------------------------------------------------------

    async def watch_ttl(self, *, interval_s: float = TTL_SCAN_INTERVAL_S,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pause running capsules of this host idle for longer than their ``timeout_sec``."""
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            if self.capsules.machines.driver is None:
                continue
            try:
                idle = await self.capsules.store.idle_past_timeout(self.capsules.host_id)
            except Exception:
                log.warning("TTL scan failed", exc_info=True)
                continue
            for capsule_id in idle:
                if await self.capsules.set_status(capsule_id, Status.PAUSING, only_from=(Status.RUNNING,),
                                                  pause_reason="ttl_expired"):
                    log.info("capsule idle past its timeout; pausing", extra={"capsule_id": capsule_id})
                    self.capsules.nursery.start_soon(self.finish_pause, capsule_id, "ttl_expired")

    # -- templates -------------------------------------------------------------------

    async def snapshot(self, msg: m.CreateSnapshot) -> m.TemplateReply:
        caps = self.capsules
        row = await caps.find(msg.actor, msg.capsule_id, msg.admin)
        caps.require_local(row)
        if row["status"] != Status.RUNNING:
            raise ServiceError(409, "not_running", f"capsule {row['id']} is {row['status']}, not running")
        name = msg.name or f"snap-{secrets.token_hex(4)}"
        if not TEMPLATE_NAME_RE.fullmatch(name):
            raise ServiceError(400, "invalid_request",
                               "name must be 1-63 letters, digits, '.', '_' or '-', starting with a "
                               "letter or digit")
        if name == MINIMAL:
            raise ServiceError(409, "already_exists", f"template {name!r} already exists")
        ready = await self.create_template(row, name, team_id=row["team_id"], actor=msg.actor)
        return m.TemplateReply(template=_template(ready))

    async def create_template(self, row: dict[str, Any], name: str, *, team_id: str,
                              actor: Any = None) -> dict[str, Any]:
        """Snapshot the running capsule ``row`` into template ``name`` of ``team_id``
        (``''``: a platform template); returns the template's row.

        Raises:
            ServiceError: 409 ``already_exists``, 500 ``snapshot_failed``.
        """
        caps = self.capsules
        driver, image = caps.machines.require()
        if caps.settings.template_dir is None:
            raise ServiceError(503, "templates_unavailable", "this host keeps no templates")
        template_id = "tpl-" + secrets.token_hex(8)
        inserted = await self.db.fetchone(
            "INSERT INTO templates (id, team_id, name, host_id, vcpus, memory_mb, disk_size_mb, "
            "source_capsule) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (team_id, name) DO NOTHING RETURNING *",
            (template_id, team_id, name, caps.host_id, row["vcpus"], row["memory_mb"],
             row["disk_size_mb"], row["id"]))
        if inserted is None:
            raise ServiceError(409, "already_exists", f"template {name!r} already exists")
        files = caps.template_files(inserted)
        capsule_id = row["id"]
        directory = caps.capsule_dir(capsule_id)
        scratch = directory / "snapshot.sav"
        began = time.monotonic()
        try:
            await trio.to_thread.run_sync(lambda: files.directory.mkdir(mode=0o755, parents=True))
            await trio.to_thread.run_sync(files.directory.chmod, 0o755)
            async with self._lock(capsule_id):
                caps.agents.close(capsule_id)
                await driver.save(capsule_id, scratch)
                try:
                    await flatten_disk(directory / "disk.qcow2", image.rootfs, files.disk)
                    await driver.restore(scratch, memory_file=files.memory, paused=True)
                    try:
                        await driver.freeze(capsule_id, files.state)
                    finally:
                        await driver.destroy(capsule_id, remove_disk=False)
                finally:
                    # The source runs on whatever happened to the template.
                    with trio.CancelScope(shield=True):
                        handle = await driver.restore(scratch,
                                                      memory_file=mapped.own_ram_file(driver, directory))
                        await trio.to_thread.run_sync(lambda: scratch.unlink(missing_ok=True))
                        await caps.reconnect(capsule_id, str(handle.agent_socket_path))
        except (DriverError, OSError, ServiceError) as exc:
            log.warning("snapshot failed", exc_info=True, extra={"capsule_id": capsule_id})
            failed = self._template_event("template.snapshot.create", inserted, actor, outcome="error",
                                          error=str(exc)[:500])
            await self._write_with_event("DELETE FROM templates WHERE id = %s RETURNING id", (template_id,),
                                         failed)
            await trio.to_thread.run_sync(lambda: shutil.rmtree(files.directory, ignore_errors=True))
            raise ServiceError(500, "snapshot_failed", f"the snapshot failed: {exc}") from exc
        size = await trio.to_thread.run_sync(disk_usage, files.directory)
        made = self._template_event("template.snapshot.create", inserted, actor,
                                    metadata={"sandbox_id": capsule_id})
        ready = await self._write_with_event(
            "UPDATE templates SET status = 'ready', size_bytes = %s WHERE id = %s RETURNING *",
            (size, template_id), made)
        assert ready is not None
        log.info("snapshot made", extra={"capsule_id": capsule_id, "template": name,
                                         "snapshot_s": round(time.monotonic() - began, 2),
                                         "size_bytes": size})
        return ready

    @staticmethod
    def _template_event(name: str, row: dict[str, Any], actor: Any, *, outcome: str = "success",
                        error: str | None = None, metadata: dict[str, str] | None = None
                        ) -> tuple[str, ev.LifecycleEvent]:
        """A lifecycle event about template ``row``, with its team's id."""
        return row["team_id"], ev.LifecycleEvent(
            event=name, resource=ev.EventResource(id=row["name"], type="template"), actor=event_actor(actor),
            timestamp=now_rfc3339(), outcome=outcome, error=error if outcome == "error" else None,
            metadata=metadata or {})

    async def _write_with_event(self, query: str, params: tuple[Any, ...],
                                event: tuple[str, ev.LifecycleEvent]) -> dict[str, Any] | None:
        """Run the templates write ``query`` (``RETURNING`` a row); when it returned one,
        stage ``event`` in its transaction. The row, or None."""
        outbox = self.capsules.events.outbox

        def work(conn: Any) -> dict[str, Any] | None:
            row = conn.execute(query, params).fetchone()
            if row is None:
                return None
            outbox.stage(conn, [event])
            return dict(row)

        row = await self.db.transaction(work)
        outbox.nudge()
        return row

    async def list_templates(self, msg: m.ListTemplates) -> m.TemplateList:
        if msg.all_teams and not msg.actor.is_admin:
            raise ServiceError(403, "forbidden", "platform admin access required")
        templates: list[m.Template] = []
        if msg.kind in ("", "base"):
            templates.append(m.Template(name=MINIMAL, type="base", vcpus=None, memory_mb=None,
                                        size_bytes=self._minimal_size(), platform=True))
        if msg.kind in ("", "snapshot"):
            if msg.all_teams:
                rows = await self.db.fetchall(
                    "SELECT * FROM templates WHERE status = 'ready' ORDER BY created_at DESC")
            else:
                rows = await self.db.fetchall(
                    "SELECT * FROM templates WHERE status = 'ready' AND team_id IN (%s, '') "
                    "ORDER BY created_at DESC", (msg.actor.team_id,))
            templates.extend(_template(r) for r in rows)
        return m.TemplateList(templates=templates)

    def _minimal_size(self) -> int:
        image = self.capsules.machines.image
        try:
            return image.rootfs.stat().st_blocks * 512 if image is not None else 0
        except OSError:
            return 0

    async def delete_template(self, msg: m.DeleteTemplate) -> m.CapsuleDone:
        caps = self.capsules
        if msg.admin and not msg.actor.is_admin:
            raise ServiceError(403, "forbidden", "platform admin access required")
        if msg.name == MINIMAL:
            raise ServiceError(403, "forbidden", "the built-in template cannot be deleted")
        if msg.admin:
            row = await self.db.fetchone("SELECT * FROM templates WHERE name = %s "
                                         "ORDER BY created_at LIMIT 1", (msg.name,))
        else:
            row = await self.db.fetchone("SELECT * FROM templates WHERE name = %s AND team_id = %s",
                                         (msg.name, msg.actor.team_id))
        if row is None:
            raise ServiceError(404, "not_found", f"template {msg.name!r} not found")
        if row["host_id"] != caps.host_id:
            return await caps.ask_host(row["host_id"], msg, m.CapsuleDone)
        in_use = await caps.store.count_from_template(row["team_id"], row["name"])
        if in_use:
            raise ServiceError(409, "template_in_use",
                               f"{in_use} capsule(s) created from {msg.name!r} still exist; "
                               "destroy them first")
        deleted = await self._write_with_event(
            "DELETE FROM templates WHERE id = %s RETURNING *", (row["id"],),
            self._template_event("template.snapshot.delete", row, msg.actor))
        if deleted is None:
            raise NOT_FOUND
        if caps.pool is not None:  # its warm spares go with it (vmmgr/pool.py)
            await caps.pool.forget_template(row["id"])
        directory = caps.template_files(row).directory
        await trio.to_thread.run_sync(lambda: shutil.rmtree(directory, ignore_errors=True))
        return m.CapsuleDone()


def _template(row: dict[str, Any]) -> m.Template:
    created: datetime = row["created_at"]
    return m.Template(name=row["name"], type=row["kind"], vcpus=row["vcpus"], memory_mb=row["memory_mb"],
                      size_bytes=int(row["size_bytes"]), created_at=rfc3339(created),
                      platform=row["team_id"] == "",
                      metadata={"source_capsule": row["source_capsule"]} if row["source_capsule"] else None)
