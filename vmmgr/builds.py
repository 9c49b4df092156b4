"""Template builds: a capsule from a base template runs shell steps, then becomes a platform template.

``SubmitBuild`` (platform admins) records a ``queued`` build and runs it in
the service nursery of the vmmgr that accepted it:

1. create a capsule of the reserved team ``platform-builds`` from
   ``base_template`` on this host and wait until it runs;
2. run each step with ``sh -c`` in order (each with ``step_timeout_sec``),
   keeping its exit code, output (up to 64 KB of each stream) and timing in
   the build's record after every step; a non-zero exit fails the build;
3. live-snapshot the capsule into the platform template ``name``
   (:meth:`~dovecote.vmmgr.snapshots.Snapshots.create_template`, ``team_id ''``:
   visible to every team);
4. destroy the capsule, whatever happened.

``CancelBuild`` cancels a queued or running build (the running step is
abandoned with the capsule). A build found ``running`` when vmmgr starts was
interrupted: it is marked ``failed``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
import trio

from dovecote.bus.messages import builds as b
from dovecote.bus.messages import capsules as m
from dovecote.bus.messages.common import Principal
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import rfc3339
from dovecote.vmmgr.capsule_store import FINAL_STATUSES, Status
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.snapshots import TEMPLATE_NAME_RE, Snapshots
from dovecote.vmmgr.templates import MINIMAL

log = get_logger("dovecote.vmmgr.builds")

BUILD_TEAM = "platform-builds"
MAX_STEPS = 100
MAX_STEP_CHARS = 16384
MAX_LOG_CHARS = 65536
MAX_STEP_TIMEOUT_S = 3600

_steps_decoder = msgspec.json.Decoder(list[b.BuildStep])


class Builds:
    """The build handlers and runner of one vmmgr."""

    def __init__(self, capsules: Capsules, snapshots: Snapshots) -> None:
        self.capsules = capsules
        self.snapshots = snapshots
        self.db = capsules.db
        self._running: dict[str, trio.CancelScope] = {}
        self.builder = Principal(auth_type="system", team_id=BUILD_TEAM, user_id="builder",
                                 name="template builder", is_admin=True)

    def register(self, handle: Callable[[type, Any], None]) -> None:
        handle(b.SubmitBuild, self.submit)
        handle(b.ListBuilds, self.list_builds)
        handle(b.GetBuild, self.get)
        handle(b.CancelBuild, self.cancel)

    async def fail_interrupted(self) -> None:
        """Builds of this host left ``queued``/``running`` by a previous process failed."""
        await self.db.execute(
            "UPDATE builds SET status = 'failed', finished_at = now(), "
            "error = 'interrupted by a restart of vmmgr' "
            "WHERE host_id = %s AND status IN ('queued', 'running')", (self.capsules.host_id,))

    # -- handlers ----------------------------------------------------------------

    async def submit(self, msg: b.SubmitBuild) -> b.BuildReply:
        _admin(msg.actor)
        if not TEMPLATE_NAME_RE.fullmatch(msg.name) or msg.name == MINIMAL:
            raise ServiceError(400, "invalid_request",
                               "name must be 1-63 letters, digits, '.', '_' or '-' (not 'minimal')")
        if not 1 <= len(msg.steps) <= MAX_STEPS or any(
                not step.strip() or len(step) > MAX_STEP_CHARS for step in msg.steps):
            raise ServiceError(400, "invalid_request",
                               f"steps must be 1 to {MAX_STEPS} non-empty commands "
                               f"of at most {MAX_STEP_CHARS} characters")
        if not 1 <= msg.step_timeout_sec <= MAX_STEP_TIMEOUT_S:
            raise ServiceError(400, "invalid_request",
                               f"step_timeout_sec must be between 1 and {MAX_STEP_TIMEOUT_S}")
        if msg.base_template != MINIMAL:
            base = await self.db.fetchone("SELECT host_id FROM templates WHERE name = %s AND team_id = '' "
                                          "AND status = 'ready'", (msg.base_template,))
            if base is None:
                raise ServiceError(404, "template_not_found",
                                   f"platform template {msg.base_template!r} not found")
            if base["host_id"] != self.capsules.host_id:
                return await self.capsules.ask_host(base["host_id"], msg, b.BuildReply)
        self.capsules.machines.require()
        taken = await self.db.fetchval("SELECT count(*) FROM templates WHERE name = %s AND team_id = ''",
                                       (msg.name,))
        if taken:
            raise ServiceError(409, "already_exists", f"template {msg.name!r} already exists")
        steps = [b.BuildStep(index=i, cmd=cmd) for i, cmd in enumerate(msg.steps)]
        build_id = "bld-" + secrets.token_hex(8)
        row = await self.db.fetchone(
            "INSERT INTO builds (id, name, base_template, host_id, steps, step_timeout_sec, created_by) "
            "VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s) ON CONFLICT DO NOTHING RETURNING *",
            (build_id, msg.name, msg.base_template, self.capsules.host_id,
             msgspec.json.encode(steps).decode(), msg.step_timeout_sec,
             msg.actor.user_id or msg.actor.api_key_id))
        if row is None:
            raise ServiceError(409, "already_exists", f"a build of {msg.name!r} is already under way")
        scope = trio.CancelScope()
        self._running[build_id] = scope
        self.capsules.nursery.start_soon(self._run, build_id, scope)
        log.info("build queued", extra={"build_id": build_id, "template": msg.name})
        return b.BuildReply(build=_build(row))

    async def list_builds(self, msg: b.ListBuilds) -> b.BuildList:
        _admin(msg.actor)
        rows = await self.db.fetchall("SELECT * FROM builds ORDER BY created_at DESC LIMIT 500")
        return b.BuildList(builds=[_build(r) for r in rows])

    async def get(self, msg: b.GetBuild) -> b.BuildReply:
        _admin(msg.actor)
        return b.BuildReply(build=_build(await self._row(msg.build_id)))

    async def cancel(self, msg: b.CancelBuild) -> m.CapsuleDone:
        _admin(msg.actor)
        row = await self._row(msg.build_id)
        if row["status"] not in ("queued", "running"):
            raise ServiceError(409, "build_finished", f"build {msg.build_id} is {row['status']}")
        if row["host_id"] != self.capsules.host_id:
            return await self.capsules.ask_host(row["host_id"], msg, m.CapsuleDone)
        scope = self._running.get(row["id"])
        if scope is not None:
            scope.cancel()
        else:  # not running here any more: settle the record
            await self._finish(row["id"], "cancelled", error="cancelled")
        return m.CapsuleDone()

    async def _row(self, build_id: str) -> dict[str, Any]:
        row = None
        if build_id and len(build_id) <= 64:
            row = await self.db.fetchone("SELECT * FROM builds WHERE id = %s", (build_id,))
        if row is None:
            raise ServiceError(404, "not_found", "build not found")
        return row

    # -- the runner ----------------------------------------------------------------

    async def _run(self, build_id: str, scope: trio.CancelScope) -> None:
        capsule_id: str | None = None
        try:
            with scope:
                row = await self.db.fetchone(
                    "UPDATE builds SET status = 'running', started_at = now() "
                    "WHERE id = %s AND status = 'queued' RETURNING *", (build_id,))
                if row is None:
                    return
                created = await self.capsules.create(m.CreateCapsule(
                    actor=self.builder, spec=m.CapsuleSpec(template=row["base_template"]), placed=True))
                capsule_id = created.capsule.id
                await self.db.execute("UPDATE builds SET capsule_id = %s WHERE id = %s",
                                      (capsule_id, build_id))
                capsule = await self._wait_running(capsule_id)
                steps = _steps_decoder.decode(json.dumps(row["steps"]))
                for step in steps:
                    if not await self._run_step(build_id, capsule_id, steps, step,
                                                row["step_timeout_sec"]):
                        await self._finish(build_id, "failed",
                                           error=f"step {step.index} exited with code {step.exit_code}")
                        return
                template = await self.snapshots.create_template(capsule, row["name"], team_id="",
                                                                actor=self.builder)
                await self._finish(build_id, "succeeded", template=template["name"])
                log.info("build succeeded", extra={"build_id": build_id, "template": row["name"]})
                return
            # Cancelled (the scope caught it).
            with trio.CancelScope(shield=True):
                await self._finish(build_id, "cancelled", error="cancelled")
        except ServiceError as exc:
            await self._finish(build_id, "failed", error=exc.message)
        except Exception as exc:
            log.exception("build failed", extra={"build_id": build_id})
            await self._finish(build_id, "failed", error=str(exc) or type(exc).__name__)
        finally:
            self._running.pop(build_id, None)
            if capsule_id is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await self.capsules.destroy(m.DestroyCapsule(
                            actor=self.builder, capsule_id=capsule_id, admin=True))
                    except ServiceError:
                        pass

    async def _wait_running(self, capsule_id: str) -> dict[str, Any]:
        with trio.fail_after(self.capsules.settings.boot_timeout_s):
            while True:
                row = await self.capsules.store.get(capsule_id)
                if row is not None and row["status"] == Status.RUNNING:
                    return row
                if row is None or row["status"] in FINAL_STATUSES:
                    error = (row or {}).get("error") or "the build capsule did not start"
                    raise ServiceError(500, "build_capsule_failed", str(error))
                await trio.sleep(0.25)

    async def _run_step(self, build_id: str, capsule_id: str, steps: list[b.BuildStep],
                        step: b.BuildStep, timeout_s: int) -> bool:
        step.status, step.started_at = "running", rfc3339(datetime.now().astimezone())
        await self._save_steps(build_id, steps)
        began = time.monotonic()
        try:
            # Steps run as root (they install packages), not as the image's default user.
            reply = await self.capsules.exec(m.ExecCommand(
                actor=self.builder, capsule_id=capsule_id, admin=True, cmd="sh",
                args=["-c", step.cmd], timeout_sec=timeout_s, user="root"))
        except ServiceError as exc:
            if exc.code != "timeout":
                raise
            step.status, step.exit_code, step.stderr = "failed", None, exc.message
            step.duration_ms = int((time.monotonic() - began) * 1000)
            await self._save_steps(build_id, steps)
            return False
        except BaseException:
            step.status = "cancelled"
            step.duration_ms = int((time.monotonic() - began) * 1000)
            with trio.CancelScope(shield=True):
                await self._save_steps(build_id, steps)
            raise
        result = reply.result
        assert result is not None
        step.exit_code = result.exit_code
        step.stdout, step.stderr = result.stdout[-MAX_LOG_CHARS:], result.stderr[-MAX_LOG_CHARS:]
        step.duration_ms = int((time.monotonic() - began) * 1000)
        step.status = "succeeded" if result.exit_code == 0 else "failed"
        await self._save_steps(build_id, steps)
        return result.exit_code == 0

    async def _save_steps(self, build_id: str, steps: list[b.BuildStep]) -> None:
        await self.db.execute("UPDATE builds SET steps = %s::jsonb WHERE id = %s",
                              (msgspec.json.encode(steps).decode(), build_id))

    async def _finish(self, build_id: str, status: str, *, error: str | None = None,
                      template: str | None = None) -> None:
        await self.db.execute(
            "UPDATE builds SET status = %s, error = %s, template = %s, finished_at = now() "
            "WHERE id = %s AND status IN ('queued', 'running')",
            (status, error[:2000] if error else None, template, build_id))


def _admin(actor: Principal) -> None:
    if not actor.is_admin:
        raise ServiceError(403, "forbidden", "platform admin access required")


def _build(row: dict[str, Any]) -> b.Build:
    steps = _steps_decoder.decode(json.dumps(row["steps"]))
    started, finished = row["started_at"], row["finished_at"]
    duration = int((finished - started).total_seconds() * 1000) if started and finished else None
    return b.Build(id=row["id"], name=row["name"], base_template=row["base_template"],
                   status=row["status"], steps=steps, template=row["template"], error=row["error"],
                   sandbox_id=row["capsule_id"], host_id=row["host_id"],
                   created_at=rfc3339(row["created_at"]), started_at=rfc3339(started),
                   finished_at=rfc3339(finished), duration_ms=duration)
