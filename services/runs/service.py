"""The runs service: scenarios, agent runs, live sessions, memory, history (``dovecote runs``).

It answers the :data:`~dovecote.bus.messages.runs.RunsRequest` family for the
gateway's ``/api/scenarios``, ``/api/runs*``, ``/api/live-sessions*``,
``/api/memory*``, ``/api/history*`` and ``/api/system/health`` routes. A run
or live session drives a desktop session of the ``desktops`` service over the
bus (provider ``DOVECOTE_RUNS_DESKTOP_PROVIDER``, qemu by default) and records
its evidence with the recorder (subject kind ``agent_run``).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import trio

from dovecote.bus.messages import codex as c
from dovecote.bus.messages import desktops as d
from dovecote.bus.messages import runs as r
from dovecote.libs.config import BaseConfig
from dovecote.libs.errors import DovecoteError, ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.planner import model_from_env
from dovecote.libs.runtime import ServiceContext, ServiceSpec
from dovecote.services.runs.codex import CodexAuth, CodexSettings, load_key
from dovecote.services.runs.desk import Events, Hub
from dovecote.services.runs.live import LiveSessions
from dovecote.services.runs.runs import Runs, RunSettings, now_iso
from dovecote.services.runs.scenarios import Scenarios, wire_error
from dovecote.services.runs.store import RunStore

log = get_logger("dovecote.runs")


class RunsConfig(BaseConfig, kw_only=True):
    """Settings of the runs service (``DOVECOTE_*`` variables)."""

    runs_desktop_provider: str = "qemu"
    """The desktop provider runs and live sessions ask for (``qemu`` or ``xvfb``)."""
    runs_ready_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=1800)] = 400.0
    vm_driver: str = "libvirt"
    """The VM driver the hosts run (``DOVECOTE_VM_DRIVER``), reported by the system health."""
    scenarios_dir: str = ""
    """A directory of scenario folders, beside the built-in set."""
    codex_issuer: str = ""
    """The codex-oauth issuer's base URL (empty: codex-oauth is off)."""
    codex_client_id: str = "dovecote"
    codex_scopes: str = "openid profile email offline_access"
    codex_authorize_path: str = "/oauth/authorize"
    codex_token_path: str = "/oauth/token"
    codex_redirect_uri: str = ""
    """A fixed callback URL registered at the issuer (else the gateway's own callback URL)."""
    codex_key: str = ""
    """Base64 of the 32-byte key sealing codex tokens (else ``<data_dir>/codex.key``)."""


@dataclass(eq=False)
class SharedRead:
    version: int
    events: list[r.Event] | None = None
    done: trio.Event = field(default_factory=trio.Event)


class RunHandlers:
    def __init__(
        self, runs: Runs, live: LiveSessions, store: RunStore, scenarios: Scenarios, hub: Hub, bus: Any
    ) -> None:
        self.runs = runs
        self.live = live
        self.store = store
        self.scenarios = scenarios
        self.hub = hub
        self.bus = bus
        self._known: set[tuple[str, str, str]] = set()
        self._reads: dict[tuple[str, str, int], SharedRead] = {}

    def register(self, handle: Any) -> None:
        for message, handler in (
            (r.ListScenarios, self.list_scenarios),
            (r.CreateRun, self.create_run),
            (r.ListRuns, self.list_runs),
            (r.GetRun, self.get_run),
            (r.StopRun, self.stop_run),
            (r.RetryRun, self.retry_run),
            (r.WaitEvents, self.wait_events),
            (r.GetReplay, self.replay),
            (r.CreateLive, self.live.create),
            (r.ListLive, self.live.list_sessions),
            (r.GetLive, self.live.get),
            (r.ObserveLive, self.live.observe),
            (r.LiveCommand, self.live.command),
            (r.ConfirmLive, self.live.confirm),
            (r.StopLive, self.live.stop),
            (r.GetFrame, self.live.frame),
            (r.CreateMemory, self.create_memory),
            (r.ListMemory, self.list_memory),
            (r.ListApps, self.list_apps),
            (r.DeleteMemory, self.delete_memory),
            (r.ListHistory, self.list_history),
            (r.GetHistory, self.get_history),
            (r.DeleteHistory, self.delete_history),
            (r.GetSystemHealth, self.health),
            (c.GetAuthStatus, self.auth_status),
            (c.CodexLogin, self.codex_login),
            (c.CodexCallback, self.codex_callback),
            (c.CodexLogout, self.codex_logout),
        ):
            handle(message, handler)

    # -- model sign-in ----------------------------------------------------------------------------

    async def _auth(self, team_id: str) -> c.AuthStatus:
        model = self.runs.settings.model
        codex = self.runs.settings.codex
        assert codex is not None
        return c.AuthStatus(
            providers={
                "api-key": c.ProviderStatus(
                    configured=model is not None,
                    signedIn=bool(model and model.api_key),
                    reason=None if model else "DOVECOTE_MODEL_BASE_URL and DOVECOTE_MODEL are not set",
                ),
                "codex-oauth": await codex.status(team_id),
            }
        )

    async def auth_status(self, msg: c.GetAuthStatus) -> c.AuthStatusReply:
        return c.AuthStatusReply(status=await self._auth(msg.actor.team_id))

    async def codex_login(self, msg: c.CodexLogin) -> c.CodexLoginReply:
        assert self.runs.settings.codex is not None
        started = await self.runs.settings.codex.login(msg.actor.team_id, msg.redirect_uri)
        return c.CodexLoginReply(login=started)

    async def codex_callback(self, msg: c.CodexCallback) -> c.AuthStatusReply:
        assert self.runs.settings.codex is not None
        team = await self.runs.settings.codex.callback(msg)
        return c.AuthStatusReply(status=await self._auth(team))

    async def codex_logout(self, msg: c.CodexLogout) -> c.AuthStatusReply:
        assert self.runs.settings.codex is not None
        await self.runs.settings.codex.logout(msg.actor.team_id)
        return c.AuthStatusReply(status=await self._auth(msg.actor.team_id))

    async def list_scenarios(self, msg: r.ListScenarios) -> r.ScenarioList:
        return r.ScenarioList(scenarios=[s.info for s in self.scenarios.all()])

    async def create_run(self, msg: r.CreateRun) -> r.RunReply:
        return r.RunReply(run=await self.runs.create(msg.actor, msg.body))

    async def list_runs(self, msg: r.ListRuns) -> r.RunList:
        return r.RunList(runs=await self.store.runs(msg.actor.team_id))

    async def get_run(self, msg: r.GetRun) -> r.RunDetail:
        run = await self.runs.lookup(msg.actor, msg.run_id)
        return r.RunDetail(run=run, events=await self.store.events(msg.actor.team_id, run.id, 0, 100_000))

    async def stop_run(self, msg: r.StopRun) -> r.RunReply:
        return r.RunReply(run=await self.runs.stop(msg.actor, msg.run_id))

    async def retry_run(self, msg: r.RetryRun) -> r.RunReply:
        return r.RunReply(run=await self.runs.retry(msg.actor, msg.run_id))

    async def replay(self, msg: r.GetReplay) -> r.ReplayReply:
        name, data = await self.runs.replay(msg.actor, msg.run_id)
        return r.ReplayReply(filename=name, data=data)

    async def wait_events(self, msg: r.WaitEvents) -> r.EventBatch:
        team = msg.actor.team_id
        key = (team, msg.kind, msg.subject_id)
        if key not in self._known:  # the subject is the team's (a 404 otherwise), checked once
            if msg.kind == "run":
                await self.runs.lookup(msg.actor, msg.subject_id)
            else:
                await self.live.lookup(msg.actor, msg.subject_id)
            if len(self._known) > 10_000:
                self._known.clear()
            self._known.add(key)
        deadline = trio.current_time() + msg.wait_s
        while True:
            version = self.hub.version(msg.subject_id)
            waiter = self.hub.waiter(msg.subject_id)
            events = await self._read(team, msg.subject_id, msg.after, version)
            if events:
                return r.EventBatch(events=events, done=False)
            if msg.kind == "run":
                run = await self.store.run(team, msg.subject_id)
                if run is None or (run.status in r.FINAL_STATUSES and msg.subject_id not in self.runs.active):
                    # The run may have appended its last events (``final``) after the read above
                    # and ended since: once it is no longer active nothing more comes, so read again.
                    late = await self.store.events(team, msg.subject_id, msg.after, 500)
                    return r.EventBatch(events=late, done=not late)
            with trio.move_on_at(deadline):
                await waiter.wait()
            if trio.current_time() >= deadline:
                return r.EventBatch(events=[], done=False)

    async def _read(self, team: str, subject_id: str, after: int, version: int) -> list[r.Event]:
        """The events after ``after``; readers at the same place share one query.

        A reader joins a query in flight only if it started once the subject's events were at
        ``version`` or later (so it cannot miss an event the reader was woken for).
        """
        key = (team, subject_id, after)
        shared = self._reads.get(key)
        if shared is not None and shared.version >= version:
            await shared.done.wait()
            if shared.events is not None:
                return shared.events
        mine = SharedRead(version=version)
        self._reads[key] = mine
        try:
            mine.events = await self.store.events(team, subject_id, after, 500)
        finally:
            if self._reads.get(key) is mine:
                del self._reads[key]
            mine.done.set()
        return mine.events

    # -- memory -------------------------------------------------------------------------------

    async def create_memory(self, msg: r.CreateMemory) -> r.MemoryReply:
        body = msg.body
        if body.content is None or not body.content.strip():
            raise wire_error(400, "content is required")
        if len(body.content) > 10_000 or len(body.tags) > 32 or any(len(t) > 64 for t in body.tags):
            raise wire_error(400, "content is at most 10000 characters, at most 32 tags of 64")
        at = now_iso()
        entry = r.MemoryEntry(
            id="mem-" + uuid.uuid4().hex[:16],
            createdAt=at,
            updatedAt=at,
            category=body.category[:64],
            appContext=body.appContext,
            scope="app" if body.appContext else "global",
            content=body.content,
            accessCount=0,
            lastAccessedAt=None,
            tags=body.tags,
            confidence=body.confidence,
        )
        await self.store.insert_memory(entry, msg.actor.team_id)
        return r.MemoryReply(entry=entry)

    async def list_memory(self, msg: r.ListMemory) -> r.MemoryList:
        entries = await self.store.memory(msg.actor.team_id, scope=msg.scope, app=msg.app)
        if msg.scope == "app" and msg.app and not entries:
            raise wire_error(404, "App profile not found.", "not_found")
        return r.MemoryList(entries=entries)

    async def list_apps(self, msg: r.ListApps) -> r.AppProfiles:
        apps: dict[str, list[r.MemoryEntry]] = {}
        for entry in await self.store.memory(msg.actor.team_id, scope="app"):
            apps.setdefault(entry.appContext or "", []).append(entry)
        return r.AppProfiles(apps=[r.AppProfile(name=k, entries=v) for k, v in sorted(apps.items())])

    async def delete_memory(self, msg: r.DeleteMemory) -> r.Deleted:
        if not await self.store.delete_memory(msg.actor.team_id, msg.entry_id):
            raise wire_error(404, "Memory entry not found.", "not_found")
        return r.Deleted()

    # -- history ------------------------------------------------------------------------------

    async def list_history(self, msg: r.ListHistory) -> r.HistoryPage:
        rows, total = await self.store.history(msg.actor.team_id, msg.limit, msg.offset)
        items = []
        for row in rows:
            rec = row["record"]
            items.append(
                r.HistoryItem(
                    id=row["id"],
                    type=row["type"],
                    createdAt=rec["createdAt"],
                    updatedAt=rec["updatedAt"],
                    status=rec["status"],
                    instruction=rec.get("latestInstruction")
                    if row["type"] == "live-session"
                    else rec.get("scenarioId"),
                    summary=rec.get("summary") if row["type"] == "run" else rec.get("latestSummary"),
                    error=rec.get("error"),
                    hasToolEvents=bool(row["tools"]),
                )
            )
        return r.HistoryPage(items=items, total=total, limit=msg.limit, offset=msg.offset)

    async def get_history(self, msg: r.GetHistory) -> r.HistoryRecord:
        team = msg.actor.team_id
        run = await self.store.run(team, msg.item_id)
        if run is not None:
            return r.HistoryRecord(
                kind="run",
                record=msgspec.to_builtins(run),
                events=await self.store.events(team, run.id, 0, 100_000),
            )
        live = await self.store.live(team, msg.item_id)
        if live is not None:
            return r.HistoryRecord(
                kind="live-session",
                record=msgspec.to_builtins(live),
                events=await self.store.events(team, live.id, 0, 100_000),
            )
        raise wire_error(404, "History item not found.", "not_found")

    async def delete_history(self, msg: r.DeleteHistory) -> r.Deleted:
        team = msg.actor.team_id
        if msg.item_id in self.runs.active or msg.item_id in self.live.active:
            raise wire_error(409, "Stop it before deleting it.", "conflict")
        if await self.store.delete_run(team, msg.item_id) or await self.store.delete_live(team, msg.item_id):
            return r.Deleted()
        raise wire_error(404, "History item not found.", "not_found")

    # -- health -------------------------------------------------------------------------------

    async def health(self, msg: r.GetSystemHealth) -> r.HealthReply:
        machine: dict[str, Any] = {
            "provider": self.runs.settings.provider,
            "vmDriver": self.runs.settings.vm_driver,
        }
        try:
            reply: d.HealthReply = await self.bus.request(
                "desktops", d.GetHealth(actor=msg.actor), timeout=5.0
            )
            providers = reply.health.providers
            machine["providers"] = msgspec.to_builtins(providers)
            qemu = providers.get("qemu")
            machine["desktopTemplate"] = qemu.status if qemu is not None else "unavailable"
            machine["status"] = reply.health.guest.status
        except DovecoteError as exc:
            machine["status"] = "unavailable"
            machine["reason"] = str(exc)
        model = self.runs.settings.model
        proxy: dict[str, Any] = {"configured": model is not None}
        if model is not None:
            proxy["model"] = model.model
            proxy["status"] = await _probe(model.base_url)
        auth = msgspec.to_builtins((await self._auth(msg.actor.team_id)).providers)
        ok = machine.get("status") == "ok"
        return r.HealthReply(
            health=r.SystemHealth(
                ok=ok, machine=machine, auth=auth, scenarios=len(self.scenarios.all()), proxy=proxy
            )
        )


async def _probe(base_url: str) -> str:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=3.0) as client:
            response = await client.get(f"{base_url}/models")
        return "ok" if response.status_code < 500 else f"answered {response.status_code}"
    except httpx.HTTPError as exc:
        return f"unreachable: {type(exc).__name__}"


async def main(
    ctx: ServiceContext[RunsConfig], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    assert ctx.db is not None
    config = ctx.config
    if config.runs_desktop_provider not in d.PROVIDERS:
        raise ServiceError(500, "config", f"DOVECOTE_RUNS_DESKTOP_PROVIDER must be one of {d.PROVIDERS}")
    store = RunStore(ctx.db)
    hub = Hub()
    events = Events(store, hub)
    scenarios = Scenarios(config.scenarios_dir)
    codex_settings = CodexSettings(
        issuer=config.codex_issuer,
        client_id=config.codex_client_id,
        scopes=config.codex_scopes,
        authorize_path=config.codex_authorize_path,
        token_path=config.codex_token_path,
        redirect_uri=config.codex_redirect_uri,
    )
    key = await trio.to_thread.run_sync(load_key, config.codex_key, config.data_dir)
    settings = RunSettings(
        provider=config.runs_desktop_provider,
        ready_timeout_s=config.runs_ready_timeout_s,
        vm_driver=config.vm_driver,
        model=model_from_env(os.environ),
        codex=CodexAuth(ctx.db, codex_settings, key),
    )
    async with trio.open_nursery() as nursery:
        runs = Runs(
            store=store, scenarios=scenarios, events=events, bus=ctx.bus, nursery=nursery, settings=settings
        )
        live = LiveSessions(store=store, events=events, bus=ctx.bus, nursery=nursery, settings=settings)
        await runs.end_leftovers()
        await live.end_leftovers()
        RunHandlers(runs, live, store, scenarios, hub, ctx.bus).register(ctx.handle)
        ctx.health_details["scenarios"] = str(len(scenarios.all()))
        task_status.started()
        try:
            await ctx.stopping.wait()
        finally:
            for scope in list(runs.active.values()) + list(live.active.values()):
                scope.cancel()
            with trio.move_on_after(30):
                while runs.active or live.active:  # noqa: ASYNC110 - a bounded wait at shutdown
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()


SPEC: ServiceSpec[RunsConfig] = ServiceSpec(
    name="runs",
    config_cls=RunsConfig,
    main=main,
    schema="runs",
    migrations="dovecote.services.runs:migrations",
)
