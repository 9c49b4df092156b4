"""Agent runs: a scenario driven on a fresh desktop session, from ``Draft`` to a final status.

The ladder (each change is a ``status`` event)::

    Draft -> PreparingMachine -> Ready -> Running -> Verifying -> Succeeded | Failed
                      any of them -> Stopped (stop) | Blocked (policy) | Failed (an error)

Each run is a task in the service's nursery under its own cancel scope:
``stop`` marks ``stopRequested`` and cancels it; the cleanup (shielded, with a
deadline) writes the final status and deletes the desktop session unless the
run asked to keep it. A run left unfinished by a previous process is ended
``Failed.ExecutionError`` at start.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import trio

from dovecote.bus.messages import desktops as d
from dovecote.bus.messages import runs as r
from dovecote.bus.messages.common import Principal
from dovecote.libs.errors import DovecoteError, ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.planner import ModelConfig, PlannerError
from dovecote.recorder.client import Evidence
from dovecote.services.runs.agent import (
    DesktopTools,
    Refused,
    StepFailed,
    run_step,
)
from dovecote.services.runs.codex import CodexAuth
from dovecote.services.runs.desk import Desk, DeskError, Events
from dovecote.services.runs.planning import make_planner, memory_for
from dovecote.services.runs.scenarios import LoadedScenario, Scenarios, render, render_tree, validate_input
from dovecote.services.runs.store import RunStore

log = get_logger("dovecote.runs")


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def run_not_found() -> ServiceError:
    return ServiceError(404, "not_found", "Run not found.", details={"wire": {"error": "Run not found."}})


@dataclass(kw_only=True)
class RunSettings:
    provider: str = "qemu"
    ready_timeout_s: float = 300.0
    vm_driver: str = "libvirt"
    model: ModelConfig | None = None
    codex: CodexAuth | None = None
    """The codex-oauth sign-ins (``authProvider: "codex-oauth"``)."""


class Finish(Exception):
    def __init__(
        self,
        status: r.RunStatus,
        code: r.RunErrorCode | None,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or {}


class Runs:
    """The runs of this service process."""

    def __init__(
        self,
        *,
        store: RunStore,
        scenarios: Scenarios,
        events: Events,
        bus: Any,
        nursery: trio.Nursery,
        settings: RunSettings,
    ) -> None:
        self.store = store
        self.scenarios = scenarios
        self.events = events
        self.bus = bus
        self.nursery = nursery
        self.settings = settings
        self.active: dict[str, trio.CancelScope] = {}

    async def lookup(self, actor: Principal, run_id: str) -> r.RunRecord:
        run = await self.store.run(actor.team_id, run_id)
        if run is None:
            raise run_not_found()
        return run

    async def create(
        self, actor: Principal, body: r.CreateRunBody, retry_of: str | None = None
    ) -> r.RunRecord:
        scenario = self.scenarios.find(body.scenarioId)
        value = validate_input(scenario.info, body.input)
        agent = body.agentType or ("planner" if self.settings.model is not None else "scripted")
        if agent == "planner" and self.settings.model is None:
            raise ServiceError(
                400,
                "planner_unavailable",
                "no model is configured (DOVECOTE_MODEL_BASE_URL, DOVECOTE_MODEL); use agentType scripted",
            )
        if (
            agent == "planner"
            and body.authProvider == "codex-oauth"
            and (self.settings.codex is None or not await self.settings.codex.signed_in(actor.team_id))
        ):
            raise ServiceError(
                400,
                "codex_not_signed_in",
                "codex-oauth is not signed in for your team (POST /api/auth/codex/login)",
            )
        if agent == "scripted" and not scenario.steps:
            raise ServiceError(400, "invalid_request", f"scenario {scenario.info.id} has no scripted steps")
        at = now_iso()
        run = r.RunRecord(
            id="run-" + uuid.uuid4().hex[:16],
            scenarioId=scenario.info.id,
            machineId=None,
            status="Draft",
            createdAt=at,
            updatedAt=at,
            input=value,
            model=body.model or (self.settings.model.model if self.settings.model else None),
            authProvider=body.authProvider,
            summary=None,
            error=None,
            replayDir=None,
            stopRequested=False,
            retryOf=retry_of,
            agentType=agent,
        )
        await self.store.insert_run(run, actor.team_id, actor)
        emit = self.events.emitter(run.id, "run", actor.team_id)
        await emit("status", "Draft", {"status": "Draft"})
        scope = trio.CancelScope()
        self.active[run.id] = scope
        self.nursery.start_soon(self._execute, run, actor, scenario, body.keepMachine, scope)
        return run

    async def stop(self, actor: Principal, run_id: str) -> r.RunRecord:
        run = await self.lookup(actor, run_id)
        scope = self.active.get(run.id)
        if run.status in r.FINAL_STATUSES or scope is None:
            return run
        run.stopRequested = True
        run.updatedAt = now_iso()
        await self.store.save_run(run)
        scope.cancel()
        return run

    async def retry(self, actor: Principal, run_id: str) -> r.RunRecord:
        run = await self.lookup(actor, run_id)
        body = r.CreateRunBody(
            scenarioId=run.scenarioId,
            authProvider=run.authProvider,  # type: ignore[arg-type]
            model=run.model,
            input=run.input,
            agentType="planner" if run.agentType == "planner" else "scripted",
        )
        return await self.create(actor, body, retry_of=run.id)

    async def end_leftovers(self) -> None:
        for run in await self.store.unfinished_runs():
            run.status = "Failed"
            run.error = r.RunError(code="Failed.ExecutionError", message="the runs service restarted")
            run.updatedAt = now_iso()
            await self.store.save_run(run)

    # -- one run ------------------------------------------------------------------------------

    async def _execute(
        self,
        run: r.RunRecord,
        actor: Principal,
        scenario: LoadedScenario,
        keep: bool,
        scope: trio.CancelScope,
    ) -> None:
        team = actor.team_id
        emit = self.events.emitter(run.id, "run", team)
        evidence = Evidence(self.bus, kind="agent_run")
        desk = Desk(self.bus, actor, self.store, run.id, emit, evidence)

        async def status(value: r.RunStatus, **changes: Any) -> None:
            run.status = value
            run.updatedAt = now_iso()
            for key, item in changes.items():
                setattr(run, key, item)
            with trio.CancelScope(shield=True):
                await self.store.save_run(run)
            await emit("status", value, {"status": value})

        outcome = Finish("Failed", "Failed.ExecutionError", "the run ended without a result")
        try:
            with scope:
                try:
                    await evidence.open(run.id, team, meta={"scenario": run.scenarioId})
                    await status("PreparingMachine")
                    profile = scenario.info.display_profile
                    session = await desk.create(
                        profile.width, profile.height, self.settings.provider, self.settings.ready_timeout_s
                    )
                    await status("Ready", machineId=session.id)
                    await status("Running")
                    await self._drive(run, scenario, desk)
                    await status("Verifying")
                    outcome = await self._verify(run, scenario, desk)
                except Finish as exc:
                    outcome = exc
                except Refused as exc:
                    outcome = Finish("Blocked", "Blocked.SecurityBoundary", str(exc))
                except StepFailed as exc:
                    outcome = Finish("Failed", exc.code, str(exc), exc.details)  # type: ignore[arg-type]
                except (DeskError, PlannerError, DovecoteError, trio.TooSlowError) as exc:
                    outcome = Finish("Failed", "Failed.ExecutionError", str(exc) or type(exc).__name__)
            if scope.cancelled_caught:
                outcome = Finish("Stopped", "Stopped.ByOperator", "stopped by the operator")
        except Exception as exc:  # a bug must still end the run
            log.exception("a run failed", extra={"run_id": run.id})
            outcome = Finish("Failed", "Failed.ExecutionError", f"{type(exc).__name__}: {exc}")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(120):
                if outcome.code is not None and outcome.status != "Succeeded":
                    await emit(
                        "error",
                        str(outcome),
                        {"code": outcome.code, **outcome.details},
                        level="warning" if outcome.status == "Stopped" else "error",
                    )
                    if outcome.status != "Stopped":
                        await evidence.failed(run.id, str(outcome))
                if not keep:
                    await desk.delete()
                error = (
                    None
                    if outcome.code is None
                    else r.RunError(code=outcome.code, message=str(outcome), details=outcome.details)
                )
                await status(outcome.status, error=error, summary=run.summary or str(outcome))
                await emit(
                    "final", outcome.status, {"status": outcome.status, "error": msgspec.to_builtins(error)}
                )
                self.active.pop(run.id, None)

    async def _drive(self, run: r.RunRecord, scenario: LoadedScenario, desk: Desk) -> None:
        if run.agentType == "scripted":
            await desk.emit(
                "agent_route",
                "scripted steps on the desktop",
                {
                    "agentType": "desktop",
                    "classifiedRoute": "scripted",
                    "driverId": "scripted",
                    "driverLabel": "Scripted steps",
                },
            )
            steps = render_tree(scenario.steps, run.input)
            for index, step in enumerate(steps, 1):
                await desk.emit("log", f"step {index}/{len(steps)}: {step.get('kind')}")
                await run_step(desk, step, scenario.policy)
            run.summary = f"{len(steps)} scripted steps done"
            return
        assert self.settings.model is not None
        await desk.emit(
            "agent_route",
            "the planner drives the desktop",
            {
                "agentType": "planner",
                "classifiedRoute": "planner",
                "driverId": "openai-compatible",
                "driverLabel": self.settings.model.model,
            },
        )
        memory = await memory_for(self.store, desk.actor.team_id, scenario.info.target_apps)
        if memory:
            ids = [m.id for m in memory]
            await desk.emit("log", f"{len(memory)} memory entries given to the planner", {"memory": ids})
        planner = make_planner(
            self.settings.model,
            model=run.model,
            auth_provider=run.authProvider,
            team_id=desk.actor.team_id,
            codex=self.settings.codex,
            memory=memory,
        )
        async with trio.open_nursery() as shots:  # screenshots go on beside the next model call
            desk.background = shots
            try:
                result = await planner.run(
                    render(scenario.info.prompt, run.input), DesktopTools(desk, scenario.policy, None)
                )
            finally:
                desk.background = None
        run.summary = result.summary
        await desk.emit("message", result.summary, {"steps": result.steps, "tokens": result.tokens})

    async def _verify(self, run: r.RunRecord, scenario: LoadedScenario, desk: Desk) -> Finish:
        verifiers = render_tree([msgspec.to_builtins(v) for v in scenario.info.verifiers], run.input)
        failed: list[dict[str, Any]] = []
        for verifier in verifiers:
            kind = verifier["type"]
            if kind == "command":
                receipt = await desk.act(d.RunCommand(command=verifier["command"]), screenshot=False)
                passed = receipt.status == "ok"
                detail: dict[str, Any] = {"exit_code": receipt.result.get("exit_code")}
            else:
                receipt = await desk.act(d.ReadFileAction(path=verifier["path"]), screenshot=False)
                contents = str(receipt.result.get("contents", "")) if receipt.status == "ok" else None
                if kind == "file":
                    passed = contents is not None
                    detail = {"exists": passed}
                else:
                    passed = contents is not None and contents.rstrip("\n") == verifier["value"].rstrip("\n")
                    detail = {"expected": verifier["value"], "actual": contents}
            payload = {"verifier": verifier, "passed": passed, **detail}
            await desk.emit(
                "verifier",
                f"{kind}: {'passed' if passed else 'rejected'}",
                payload,
                level="info" if passed else "warning",
            )
            if not passed:
                failed.append(payload)
        if failed:
            return Finish(
                "Failed",
                "Failed.VerifierRejected",
                f"{len(failed)} of {len(verifiers)} verifiers rejected the result",
                {"failed": failed},
            )
        return Finish("Succeeded", None, f"{len(verifiers)} verifiers passed")

    # -- replay -----------------------------------------------------------------------------

    async def replay(self, actor: Principal, run_id: str) -> tuple[str, bytes]:
        """``run.json``, ``events.jsonl`` and the review bundle (timeline, deduplicated screenshots)."""
        run = await self.lookup(actor, run_id)
        events = await self.store.events(actor.team_id, run.id, 0, 100_000)
        shots = await self.store.screenshots(run.id)
        review = None
        try:
            from dovecote.bus.messages import recorder as rec

            exported = await self.bus.request(
                "recorder", rec.ExportBundle(subject_id=run.id, team_id=actor.team_id), timeout=60.0
            )
            review = msgspec.to_builtins(exported)
        except DovecoteError as exc:
            review = {"unavailable": str(exc)}
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("run.json", msgspec.json.encode(run))
            archive.writestr("events.jsonl", b"".join(msgspec.json.encode(e) + b"\n" for e in events))
            timeline = [
                e
                for e in events
                if e.type in ("computer_action", "tool_result", "screenshot", "status", "verifier", "final")
            ]
            archive.writestr(
                "review/timeline.jsonl", b"".join(msgspec.json.encode(e) + b"\n" for e in timeline)
            )
            archive.writestr(
                "review/review.json",
                json.dumps(
                    {
                        "run_id": run.id,
                        "scenario": run.scenarioId,
                        "status": run.status,
                        "screenshot_count": len(shots),
                        "recorder": review,
                    },
                    default=str,
                ),
            )
            for shot in shots:
                archive.writestr(f"review/screenshots/{shot['sha256']}.png", bytes(shot["png"]))
        return f"{run.id}-replay.zip", buffer.getvalue()
