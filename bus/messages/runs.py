"""Messages of the runs service: scenarios, agent runs, live sessions, memory, history, health.

The wire shapes of the agent runs reference (``/api/scenarios``, ``/api/runs*``,
``/api/live-sessions*``, ``/api/memory*``, ``/api/history*``,
``/api/system/health``) are the Structs here, camelCase as the reference writes
them. Every request names its ``actor``; the service scopes every read and
change to ``actor.team_id`` (another team's run is not found).

Refusals are raised as :class:`~dovecote.libs.errors.ServiceError`. The
reference's own error bodies are plain strings (``{"error": "Run not found."}``,
``{"error": "Unknown scenario: x"}``); a refusal carries that exact body in
``details["wire"]`` and the gateway sends it as is.

Events are read with :class:`WaitEvents`, a long poll: the reply comes at once
when events after ``after`` exist, else when one is appended or ``wait_s``
passes. ``done`` says the subject ended (a run in a final status) and every
event up to then was delivered.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

from .base import Family, Message, Request
from .common import Principal

RUN_STATUSES = (
    "Draft",
    "PreparingMachine",
    "Ready",
    "Running",
    "Verifying",
    "Succeeded",
    "Failed",
    "Retrying",
    "Blocked",
    "Stopped",
)
FINAL_STATUSES = ("Succeeded", "Failed", "Blocked", "Stopped")
EVENT_TYPES = (
    "status",
    "log",
    "message",
    "tool_call",
    "tool_result",
    "computer_action",
    "screenshot",
    "error",
    "agent_route",
    "verifier",
    "final",
)

RunStatus = Literal[
    "Draft",
    "PreparingMachine",
    "Ready",
    "Running",
    "Verifying",
    "Succeeded",
    "Failed",
    "Retrying",
    "Blocked",
    "Stopped",
]
RunErrorCode = Literal[
    "Failed.VerifierRejected",
    "Blocked.SecurityBoundary",
    "Stopped.ByOperator",
    "Failed.ElementNotFound",
    "Failed.ExecutionError",
]
EventType = Literal[
    "status",
    "log",
    "message",
    "tool_call",
    "tool_result",
    "computer_action",
    "screenshot",
    "error",
    "agent_route",
    "verifier",
    "final",
]
EventLevel = Literal["info", "warning", "error"]
AuthProvider = Literal["api-key", "codex-oauth"]
AgentType = Literal["scripted", "planner", "desktop", "cli"]
LiveStatus = Literal["idle", "observing", "acting", "error", "waiting_confirmation"]
SubjectKind = Literal["run", "live"]
MemoryScope = Literal["app", "global"]

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


# -- shapes of the reference ------------------------------------------------------------


class RunError(msgspec.Struct, kw_only=True):
    code: RunErrorCode
    message: str
    details: dict[str, Any] = {}


class RunRecord(msgspec.Struct, kw_only=True):
    id: str
    scenarioId: str
    machineId: str | None
    status: RunStatus
    createdAt: str
    updatedAt: str
    input: dict[str, Any]
    model: str | None
    authProvider: str
    summary: str | None
    error: RunError | None
    replayDir: str | None
    stopRequested: bool
    retryOf: str | None
    agentType: str = "scripted"
    """Which agent drove the run (a Dovecote addition)."""


class Event(msgspec.Struct, kw_only=True):
    """One event of a run (``runId``) or of a live session (``sessionId``)."""

    id: int
    at: str
    type: EventType
    level: EventLevel
    message: str
    payload: dict[str, Any] = {}
    runId: str | None = None
    sessionId: str | None = None


class Verifier(msgspec.Struct, kw_only=True):
    type: Literal["file", "file_text_equals", "command"]
    path: str = ""
    value: str = ""
    command: str = ""


class DisplayProfile(msgspec.Struct, kw_only=True):
    width: Annotated[int, msgspec.Meta(ge=320, le=3840)] = 1280
    height: Annotated[int, msgspec.Meta(ge=240, le=2160)] = 800


class Scenario(msgspec.Struct, kw_only=True):
    """A scenario's manifest as ``GET /api/scenarios`` lists it (plus its folder and prompt)."""

    id: str
    title: str
    owner: str = ""
    description: str = ""
    target_apps: list[str] = []
    display_profile: DisplayProfile = msgspec.field(default_factory=DisplayProfile)
    input_schema: dict[str, Any] = {}
    success_criteria: list[str] = []
    verifiers: list[Verifier] = []
    folder: str = ""
    prompt: str = ""
    builtin: bool = False


class PendingConfirmation(msgspec.Struct, kw_only=True):
    message: str
    options: list[str]
    resolveWith: str | None
    requestedAt: str


class LiveSession(msgspec.Struct, kw_only=True):
    id: str
    createdAt: str
    updatedAt: str
    model: str | None
    authProvider: str
    agentType: str
    agentConfig: dict[str, Any]
    status: LiveStatus
    artifactDir: str | None
    latestScreenshotUrl: str | None
    latestInstruction: str | None
    latestSummary: str | None
    stopRequested: bool
    error: str | None
    pendingConfirmation: PendingConfirmation | None
    machineId: str | None = None


class MemoryEntry(msgspec.Struct, kw_only=True):
    id: str
    createdAt: str
    updatedAt: str
    category: str
    appContext: str | None
    scope: MemoryScope
    content: str
    accessCount: int
    lastAccessedAt: str | None
    tags: list[str]
    confidence: float


class AppProfile(msgspec.Struct, kw_only=True):
    name: str
    entries: list[MemoryEntry]


class HistoryItem(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["live-session", "run"]
    createdAt: str
    updatedAt: str
    status: str
    instruction: str | None
    summary: str | None
    error: Any
    hasToolEvents: bool


class SystemHealth(msgspec.Struct, kw_only=True):
    ok: bool
    machine: dict[str, Any]
    auth: dict[str, Any]
    scenarios: int
    proxy: dict[str, Any]


# -- request bodies ---------------------------------------------------------------------


class CreateRunBody(msgspec.Struct, kw_only=True):
    scenarioId: Id
    authProvider: AuthProvider = "api-key"
    model: str | None = None
    input: dict[str, Any] = {}
    agentType: Literal["scripted", "planner"] | None = None
    """Default: ``planner`` when a model is configured, else ``scripted``."""
    keepMachine: bool = False
    """Keep the run's desktop session for review instead of deleting it at the end."""


class CreateLiveBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    authProvider: AuthProvider = "api-key"
    agentType: AgentType | None = None
    agentConfig: dict[str, Any] = {}


class CommandBody(msgspec.Struct, kw_only=True):
    instruction: str | None = None
    authProvider: AuthProvider | None = None
    model: str | None = None


class ConfirmBody(msgspec.Struct, kw_only=True):
    choice: str = "confirmed"


class CreateMemoryBody(msgspec.Struct, kw_only=True):
    content: str | None = None
    category: str = "preference"
    appContext: str | None = None
    tags: list[str] = []
    confidence: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.8


# -- replies ------------------------------------------------------------------------------


class ScenarioList(Message, tag="runs.scenarios", kw_only=True):
    scenarios: list[Scenario]


class RunReply(Message, tag="runs.run", kw_only=True):
    run: RunRecord


class RunList(Message, tag="runs.run_list", kw_only=True):
    runs: list[RunRecord]


class RunDetail(Message, tag="runs.run_detail", kw_only=True):
    run: RunRecord
    events: list[Event]


class EventBatch(Message, tag="runs.events", kw_only=True):
    events: list[Event]
    done: bool = False


class ReplayReply(Message, tag="runs.replay", kw_only=True):
    filename: str
    data: bytes


class LiveReply(Message, tag="runs.live", kw_only=True):
    session: LiveSession


class LiveList(Message, tag="runs.live_list", kw_only=True):
    sessions: list[LiveSession]


class LiveDetail(Message, tag="runs.live_detail", kw_only=True):
    session: LiveSession
    events: list[Event]


class ObserveReply(Message, tag="runs.observed", kw_only=True):
    session: LiveSession
    heartbeat: dict[str, Any]
    windows: list[dict[str, Any]]
    screenshot: dict[str, Any]


class FrameReply(Message, tag="runs.frame", kw_only=True):
    timestamp: int
    width: int
    height: int
    jpeg: bytes


class MemoryReply(Message, tag="runs.memory", kw_only=True):
    entry: MemoryEntry


class MemoryList(Message, tag="runs.memory_list", kw_only=True):
    entries: list[MemoryEntry]


class AppProfiles(Message, tag="runs.app_profiles", kw_only=True):
    apps: list[AppProfile]


class Deleted(Message, tag="runs.deleted", kw_only=True):
    deleted: bool = True


class HistoryPage(Message, tag="runs.history", kw_only=True):
    items: list[HistoryItem]
    total: int
    limit: int
    offset: int


class HistoryRecord(Message, tag="runs.history_record", kw_only=True):
    kind: Literal["live-session", "run"]
    """The record's type (``type`` on the wire; the bus tag field owns ``type`` here)."""
    record: dict[str, Any]
    events: list[Event]


class HealthReply(Message, tag="runs.health", kw_only=True):
    health: SystemHealth


# -- requests (service "runs") --------------------------------------------------------------


class ListScenarios(Request[ScenarioList], tag="runs.scenarios_list", kw_only=True):
    idempotent = True
    actor: Principal


class CreateRun(Request[RunReply], tag="runs.create", kw_only=True):
    """Start a run: 202 ``Draft`` at once; the run climbs its statuses in the service."""

    actor: Principal
    body: CreateRunBody


class ListRuns(Request[RunList], tag="runs.list", kw_only=True):
    idempotent = True
    actor: Principal


class GetRun(Request[RunDetail], tag="runs.get", kw_only=True):
    idempotent = True
    actor: Principal
    run_id: Id


class StopRun(Request[RunReply], tag="runs.stop", kw_only=True):
    actor: Principal
    run_id: Id


class RetryRun(Request[RunReply], tag="runs.retry", kw_only=True):
    actor: Principal
    run_id: Id


class WaitEvents(Request[EventBatch], tag="runs.wait_events", kw_only=True):
    """Events of a run or live session after ``after`` (long poll up to ``wait_s``)."""

    idempotent = True
    actor: Principal
    kind: SubjectKind
    subject_id: Id
    after: int = 0
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=30)] = 10.0


class GetReplay(Request[ReplayReply], tag="runs.replay_get", kw_only=True):
    idempotent = True
    actor: Principal
    run_id: Id


class CreateLive(Request[LiveReply], tag="runs.live_create", kw_only=True):
    actor: Principal
    body: CreateLiveBody


class ListLive(Request[LiveList], tag="runs.live_list_get", kw_only=True):
    idempotent = True
    actor: Principal


class GetLive(Request[LiveDetail], tag="runs.live_get", kw_only=True):
    idempotent = True
    actor: Principal
    session_id: Id


class ObserveLive(Request[ObserveReply], tag="runs.live_observe", kw_only=True):
    actor: Principal
    session_id: Id


class LiveCommand(Request[LiveReply], tag="runs.live_command", kw_only=True):
    actor: Principal
    session_id: Id
    body: CommandBody


class ConfirmLive(Request[LiveReply], tag="runs.live_confirm", kw_only=True):
    actor: Principal
    session_id: Id
    body: ConfirmBody


class StopLive(Request[LiveReply], tag="runs.live_stop", kw_only=True):
    actor: Principal
    session_id: Id


class GetFrame(Request[FrameReply], tag="runs.live_frame", kw_only=True):
    """The live session's screen now, as a JPEG (the screen stream polls it while someone listens)."""

    idempotent = True
    actor: Principal
    session_id: Id


class CreateMemory(Request[MemoryReply], tag="runs.memory_create", kw_only=True):
    actor: Principal
    body: CreateMemoryBody


class ListMemory(Request[MemoryList], tag="runs.memory_list_get", kw_only=True):
    idempotent = True
    actor: Principal
    scope: MemoryScope = "global"
    app: str | None = None


class ListApps(Request[AppProfiles], tag="runs.memory_apps", kw_only=True):
    idempotent = True
    actor: Principal


class DeleteMemory(Request[Deleted], tag="runs.memory_delete", kw_only=True):
    actor: Principal
    entry_id: Id


class ListHistory(Request[HistoryPage], tag="runs.history_list", kw_only=True):
    idempotent = True
    actor: Principal
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class GetHistory(Request[HistoryRecord], tag="runs.history_get", kw_only=True):
    idempotent = True
    actor: Principal
    item_id: Id


class DeleteHistory(Request[Deleted], tag="runs.history_delete", kw_only=True):
    actor: Principal
    item_id: Id


class GetSystemHealth(Request[HealthReply], tag="runs.health_get", kw_only=True):
    idempotent = True
    actor: Principal


RunsRequest = Union[  # noqa: UP007 - msgspec needs a runtime union of the tagged Structs
    ListScenarios,
    CreateRun,
    ListRuns,
    GetRun,
    StopRun,
    RetryRun,
    WaitEvents,
    GetReplay,
    CreateLive,
    ListLive,
    GetLive,
    ObserveLive,
    LiveCommand,
    ConfirmLive,
    StopLive,
    GetFrame,
    CreateMemory,
    ListMemory,
    ListApps,
    DeleteMemory,
    ListHistory,
    GetHistory,
    DeleteHistory,
    GetSystemHealth,
]
"""Every request the runs service answers."""

request_decoder = msgspec.msgpack.Decoder(RunsRequest)


FAMILY = Family("runs", __name__)
"""The runs messages and their one Decoder (define every message above this line)."""
