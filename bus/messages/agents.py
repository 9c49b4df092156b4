"""The agent runtime's messages: the gateway asks the ``agents`` service.

Two families, each one tagged union with one decoder:

* :data:`AgentRequest`: what an agent asks through ``/api/agent/*``. Every
  request carries the caller's :class:`AgentIdentity` (the reference's
  ``X-AGH-*`` headers plus the sha256 of its bearer token; the raw token never
  leaves the gateway). The service checks it before anything else.
* :data:`OperatorRequest`: what users with an API key or a session ask
  through ``/v1/agent/*`` (workspaces, sessions, tasks, runs, souls,
  coordinator settings); they carry the authenticated :class:`Principal`.

The bodies (``Session``, ``Run``, ``Lease``...) are the reference's JSON
objects; enums are ``Literal`` fields. Refusals are the service's
:mod:`dovecote.services.agents.errors`. New fields get defaults; unknown
fields are skipped (rolling upgrades).

Raw secrets: the agent token is answered once by :class:`SessionCreated`
(and a spawn); no message ever holds a raw claim token, only
``claim_token_hash``.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec

from .base import Family, Message, Request
from .common import Principal

RunStatus = Literal[
    "queued", "claimed", "starting", "running", "completed", "failed", "canceled", "needs_attention"
]
LeaseStatus = Literal["claimed", "completed", "failed", "queued"]
SessionState = Literal["starting", "active", "stopping", "stopped"]
SessionType = Literal["user", "spawned"]
StopReason = Literal["completed", "operator_stop", "parent_stopped", "ttl_expired"]
MessageKind = Literal["status", "request", "reply", "blocker", "handoff", "result", "review_request"]
Priority = Literal["low", "medium", "high", "urgent"]
TaskStatus = Literal["draft", "ready", "in_progress", "completed", "failed", "canceled"]
SoulStatus = Literal["missing", "valid", "invalid"]
Severity = Literal["info", "warning", "error"]
CoordinatorSource = Literal["workspace", "default"]
RefKind = Literal["human", "agent_session", "api_key", "system"]
OriginKind = Literal["cli", "api", "agent", "system"]
LeaseAction = Literal["heartbeat", "complete", "fail", "release"]

MESSAGE_KINDS: tuple[str, ...] = (
    "status",
    "request",
    "reply",
    "blocker",
    "handoff",
    "result",
    "review_request",
)
PRIORITY_RANK = {"low": 0, "medium": 1, "high": 2, "urgent": 3}

AGENT_EVENT_NAMES = (
    "agent.session.created",
    "agent.session.spawned",
    "agent.session.stopped",
    "agent.task.created",
    "agent.task.queued",
    "agent.task.claimed",
    "agent.task.completed",
    "agent.task.failed",
    "agent.task.released",
    "agent.task.requeued",
)
"""Lifecycle events of the agent runtime (the notifier's log, SSE streams, channels)."""


class Body(msgspec.Struct, kw_only=True):
    """Base of the reference's JSON objects (every field present, nulls included)."""


# -- shared objects -------------------------------------------------------------------


class Ref(Body):
    kind: RefKind
    ref: str


class Origin(Body):
    kind: OriginKind
    ref: str


class PermissionPolicy(Body):
    """Names an agent may use, per kind; ``"*"`` means any."""

    mcp_servers: list[str] = []
    network_channels: list[str] = []
    sandbox_profiles: list[str] = []
    skills: list[str] = []
    tools: list[str] = []
    workspace_paths: list[str] = []


class SpawnBudget(Body):
    max_active_per_workspace: int
    max_children: int
    max_depth: int
    ttl_seconds: int = 0


class Lineage(Body):
    auto_stop_on_parent: bool
    parent_session_id: str | None
    permission_policy: PermissionPolicy
    root_session_id: str
    spawn_budget: SpawnBudget
    spawn_depth: int
    spawn_role: str
    ttl_expires_at: str | None


class Session(Body):
    id: str
    agent_name: str
    name: str
    channel: str
    provider: str
    model: str
    state: SessionState
    type: SessionType
    workspace_id: str
    created_at: str
    updated_at: str
    lineage: Lineage
    capabilities: list[str] = []
    stop_reason: StopReason | None = None
    stop_detail: str = ""
    capsule_id: str | None = None
    """The capsule the session is bound to (code in it calls the agent endpoint with no token)."""


class Workspace(Body):
    id: str
    name: str
    root_dir: str
    created_at: str = ""


class Channel(Body):
    id: str
    channel: str
    display_name: str
    purpose: str
    allowed_message_kinds: list[MessageKind]
    last_activity_at: str | None
    run_id: str | None
    task_id: str | None
    workflow_id: str | None
    workspace_id: str


class MessageMetadata(Body):
    coordination_channel_id: str
    correlation_id: str
    message_kind: MessageKind
    run_id: str
    task_id: str
    workflow_id: str | None = None
    ext: dict[str, Any] | None = None


class ChannelMessage(Body):
    message_id: str
    channel_id: str
    from_session_id: str
    to_session_id: str | None
    metadata: MessageMetadata
    body: Any
    timestamp: str


class Task(Body):
    id: str
    identifier: str
    workspace_id: str
    title: str
    description: str
    priority: Priority
    status: TaskStatus
    scope: Literal["workspace"]
    owner: Ref
    paused: bool
    effective_paused: bool
    paused_by_task_id: str | None
    latest_event_seq: int
    network_channel: str
    required_capabilities: list[str]
    created_at: str
    updated_at: str


class Run(Body):
    id: str
    task_id: str
    status: RunStatus
    attempt: int
    max_attempts: int
    claim_token_hash: str | None
    claimed_at: str | None
    claimed_by: Ref | None
    coordination_channel_id: str
    coordination_channel: Channel | None
    ended_at: str | None
    error: str | None
    failure_kind: str | None
    heartbeat_at: str | None
    idempotency_key: str | None
    lease_until: str | None
    metadata: Any
    network_channel: str
    origin: Origin
    previous_run_id: str | None
    queued_at: str
    result: Any
    session_id: str | None
    started_at: str | None


class Lease(Body):
    claim_token_hash: str | None
    claimed_by: Ref | None
    coordination_channel: Channel | None
    coordination_channel_id: str
    heartbeat_at: str | None
    lease_until: str | None
    run_id: str
    session_id: str | None
    status: LeaseStatus
    task_id: str


class Claim(Body):
    coordination_channel: Channel
    lease: Lease
    run: Run
    task: Task


class Coordinator(Body):
    agent_name: str
    default_ttl_seconds: int
    enabled: bool
    max_active_sessions_per_workspace: int
    max_children: int
    max_depth: int
    model: str
    provider: str
    source: CoordinatorSource
    workspace_id: str


class Capability(Body):
    id: str
    source: str
    summary: str


class Limits(Body):
    context_section_limit: int
    max_active_task_leases: int
    max_children: int
    max_spawn_depth: int


class SelfInfo(Body):
    agent_name: str
    model: str
    provider: str
    session_id: str


class SoulFrontmatter(Body):
    role: str | None = None
    tone: list[str] = []
    principles: list[str] = []
    constraints: list[str] = []
    collaboration: list[str] = []
    memory_policy: list[str] = []
    tags: list[str] = []
    version: str | None = None


class SoulDiagnostic(Body):
    code: str
    message: str
    line: int
    column: int
    field: str
    severity: Severity
    section: str
    owner_surface: str = "soul"
    source_path: str = ""


class SoulLimits(Body):
    context_projection_bytes: int
    max_body_bytes: int
    max_bytes: int


class SoulProvenance(Body):
    context_projection_bytes: int
    digest: str
    enabled: bool
    max_body_bytes: int
    source: str


class Soul(Body):
    """The reference's soul document (``GET /api/agent/soul``, validate, operator PUT)."""

    active: bool
    agent_name: str
    body: str
    config_provenance: SoulProvenance
    created_at: str | None
    diagnostics: list[SoulDiagnostic]
    digest: str
    enabled: bool
    frontmatter: SoulFrontmatter
    limits: SoulLimits
    present: bool
    revision_id: str | None
    snapshot_id: str | None
    source_path: str
    truncated: bool
    valid: bool
    validation_status: SoulStatus


class Me(Body):
    active_task_leases: list[Lease]
    capabilities: list[Capability]
    channels: list[Channel]
    coordinator: Coordinator
    limits: Limits
    self: SelfInfo
    session: Session
    workspace: Workspace


class Spawn(Body):
    lineage: Lineage
    permissions: PermissionPolicy
    session: Session
    token: str | None = None
    """The child's agent token, shown once (null when an idempotent repeat returns an existing child)."""


# -- context ---------------------------------------------------------------------------


class Section(Body):
    limit: int
    returned: int
    truncated: bool


class CapabilitiesSection(Body):
    capabilities: list[Capability]
    section: Section


class ChannelSection(Body):
    available: bool
    channel: Channel | None


class InboxItem(Body):
    channel_id: str
    kind: MessageKind
    message_id: str
    metadata: MessageMetadata
    preview: str
    timestamp: str


class InboxSummary(Body):
    items: list[InboxItem]
    section: Section
    unread_count: int


class Peer(Body):
    capabilities: list[str]
    channel_id: str | None
    display_name: str
    peer_id: str
    session_id: str


class PeerRoster(Body):
    peers: list[Peer]
    section: Section


class Provenance(Body):
    generated_at: str
    source: str


class SoulProjection(Body):
    active: bool
    config_digest: str
    digest: str
    enabled: bool
    max_body_bytes: int
    max_bytes: int
    present: bool
    principles: list[str]
    role: str | None
    snapshot_id: str | None
    source_path: str
    tone: list[str]
    truncated: bool
    valid: bool
    validation_status: SoulStatus


class TaskLimits(Body):
    context_body_max_bytes: int
    max_runtime_seconds: int
    summary_max_bytes: int


class TaskBundle(Body):
    current_run: Run
    handoff_summary: str
    latest_event_seq: int
    limits: TaskLimits
    prior_attempts: list[Run]
    recent_events: list[Any]
    task: Task


class TaskSection(Body):
    available: bool
    bundle: TaskBundle | None
    lease: Lease | None
    task: Task | None


class ContextSession(Body):
    channel: str
    created_at: str
    id: str
    lineage: Lineage
    name: str
    state: SessionState
    type: SessionType
    updated_at: str


class Context(Body):
    capabilities: CapabilitiesSection
    coordination_channel: ChannelSection
    inbox_summary: InboxSummary
    limits: Limits
    peer_roster: PeerRoster
    provenance: Provenance
    self: SelfInfo
    session: ContextSession
    soul: SoulProjection
    task: TaskSection
    workspace: Workspace


# -- agent requests (/api/agent/*) ----------------------------------------------------


class AgentIdentity(msgspec.Struct, kw_only=True):
    """Who an agent says it is, and its proof (sha256 hex of the bearer token, or empty)."""

    session_id: str
    agent_name: str
    workspace_id: str = ""
    token_sha256: str = ""
    capsule_id: str = ""
    """Set only by the gateway's relay of a capsule's agent endpoint: the capsule is the proof,
    and the session is the one bound to it (``session_id``/``agent_name`` may then be empty)."""


class AgentCall(Message, kw_only=True):
    """Abstract base (its tag has no dot): every agent request carries its identity."""

    identity: AgentIdentity


class GetMe(AgentCall, Request["MeReply"], tag="agents.me", kw_only=True):
    """Reply :class:`MeReply`."""


class GetContext(AgentCall, Request["ContextReply"], tag="agents.context", kw_only=True):
    """Reply :class:`ContextReply`."""


class ListAgentChannels(AgentCall, Request["ChannelsReply"], tag="agents.channels", kw_only=True):
    """Reply :class:`ChannelsReply`."""


class SendMessage(AgentCall, Request["MessageReply"], tag="agents.send", kw_only=True):
    """Reply :class:`MessageReply`; ``idempotency_key`` returns the first message when repeated."""

    channel_id: str
    metadata: MessageMetadata
    body: Any = None
    to_session_id: str | None = None
    idempotency_key: str | None = None


class ReplyMessage(AgentCall, Request["MessageReply"], tag="agents.reply", kw_only=True):
    """Reply :class:`MessageReply` (kind ``reply``, the source's metadata)."""

    reply_to_message_id: str
    body: Any = None
    correlation_id: str | None = None
    ext: dict[str, Any] | None = None
    idempotency_key: str | None = None


class ReceiveMessages(AgentCall, Request["MessagesReply"], tag="agents.recv", kw_only=True):
    """Reply :class:`MessagesReply`: up to ``limit`` unread messages, waiting up to ``wait_s`` for one."""

    channel_id: str
    wait_s: float = 0.0
    limit: int = 50


class ClaimNext(AgentCall, Request["ClaimReply"], tag="agents.claim_next", kw_only=True):
    """Reply :class:`ClaimReply` (``claim`` null: nothing claimable within ``wait_s``)."""

    lease_seconds: float | None = None
    wait_s: float = 0.0


class ChangeLease(AgentCall, Request["LeaseReply"], tag="agents.lease", kw_only=True):
    """Reply :class:`LeaseReply`."""

    run_id: str
    action: LeaseAction
    lease_seconds: float | None = None
    result: Any = None
    error: str | None = None
    reason: str | None = None


class SpawnSession(AgentCall, Request["SpawnReply"], tag="agents.spawn", kw_only=True):
    """Reply :class:`SpawnReply`."""

    agent_name: str
    auto_stop_on_parent: bool = True
    permissions: dict[str, list[str] | None] | None = None
    spawn_role: str = ""
    ttl_seconds: int | None = None
    idempotency_key: str | None = None
    name: str = ""
    capabilities: list[str] | None = None


class GetSoul(AgentCall, Request["SoulReply"], tag="agents.soul", kw_only=True):
    """Reply :class:`SoulReply` (the caller's agent's soul)."""


class ValidateSoul(AgentCall, Request["SoulReply"], tag="agents.soul_validate", kw_only=True):
    """Reply :class:`SoulReply`; ``content`` null validates the stored soul."""

    content: str | None = None


class GetCoordinatorConfig(
    AgentCall, Request["CoordinatorReply"], tag="agents.coordinator_config", kw_only=True
):
    """Reply :class:`CoordinatorReply`; ``workspace`` empty is the caller's."""

    workspace: str = ""


# -- operator requests (/v1/agent/*) --------------------------------------------------


class OperatorCall(Message, kw_only=True):
    """Abstract base (its tag has no dot): every operator request carries the authenticated principal."""

    actor: Principal


class CreateWorkspace(OperatorCall, Request["WorkspaceReply"], tag="agents.workspace_create", kw_only=True):
    name: str
    root_dir: str = ""


class ListWorkspaces(OperatorCall, Request["WorkspacesReply"], tag="agents.workspace_list", kw_only=True):
    pass


class CreateSession(OperatorCall, Request["SessionCreated"], tag="agents.session_create", kw_only=True):
    workspace_id: str
    agent_name: str
    name: str = ""
    channel: str = ""
    provider: str = ""
    model: str = ""
    ttl_seconds: int | None = None
    capabilities: list[str] = []
    permissions: dict[str, list[str] | None] | None = None
    capsule_template: str | None = None
    """Bind the session to a new capsule of this template (its credential; it ends with the session)."""


class ListSessions(OperatorCall, Request["SessionsReply"], tag="agents.session_list", kw_only=True):
    workspace_id: str = ""
    state: str = ""


class GetSession(OperatorCall, Request["SessionReply"], tag="agents.session_get", kw_only=True):
    session_id: str


class StopSession(OperatorCall, Request["SessionReply"], tag="agents.session_stop", kw_only=True):
    session_id: str
    detail: str = ""


class CreateTask(OperatorCall, Request["TaskReply"], tag="agents.task_create", kw_only=True):
    workspace_id: str
    title: str
    description: str = ""
    priority: Priority = "medium"
    network_channel: str = ""
    required_capabilities: list[str] = []


class ListTasks(OperatorCall, Request["TasksReply"], tag="agents.task_list", kw_only=True):
    workspace_id: str = ""


class GetTask(OperatorCall, Request["TaskReply"], tag="agents.task_get", kw_only=True):
    task_id: str


class QueueRun(OperatorCall, Request["RunReply"], tag="agents.run_queue", kw_only=True):
    task_id: str
    idempotency_key: str | None = None
    network_channel: str | None = None
    max_attempts: int | None = None


class GetRun(OperatorCall, Request["RunReply"], tag="agents.run_get", kw_only=True):
    run_id: str


class PutSoul(OperatorCall, Request["SoulReply"], tag="agents.soul_put", kw_only=True):
    agent_name: str
    content: str


class PutCoordinator(OperatorCall, Request["CoordinatorReply"], tag="agents.coordinator_put", kw_only=True):
    workspace_id: str
    enabled: bool = True
    agent_name: str = ""
    provider: str = ""
    model: str = ""
    max_children: int | None = None
    max_depth: int | None = None
    max_active_sessions_per_workspace: int | None = None
    default_ttl_seconds: int | None = None


# -- replies ----------------------------------------------------------------------------


class MeReply(Message, tag="agents.me_reply", kw_only=True):
    me: Me


class ContextReply(Message, tag="agents.context_reply", kw_only=True):
    context: Context


class ChannelsReply(Message, tag="agents.channels_reply", kw_only=True):
    channels: list[Channel]


class MessageReply(Message, tag="agents.message_reply", kw_only=True):
    message: ChannelMessage


class MessagesReply(Message, tag="agents.messages_reply", kw_only=True):
    messages: list[ChannelMessage]


class ClaimReply(Message, tag="agents.claim_reply", kw_only=True):
    claim: Claim | None


class LeaseReply(Message, tag="agents.lease_reply", kw_only=True):
    lease: Lease


class SpawnReply(Message, tag="agents.spawn_reply", kw_only=True):
    spawn: Spawn


class SoulReply(Message, tag="agents.soul_reply", kw_only=True):
    soul: Soul


class CoordinatorReply(Message, tag="agents.coordinator_reply", kw_only=True):
    coordinator: Coordinator


class WorkspaceReply(Message, tag="agents.workspace_reply", kw_only=True):
    workspace: Workspace


class WorkspacesReply(Message, tag="agents.workspaces_reply", kw_only=True):
    workspaces: list[Workspace]


class SessionCreated(Message, tag="agents.session_created", kw_only=True):
    session: Session
    token: str


class SessionReply(Message, tag="agents.session_reply", kw_only=True):
    session: Session
    children: list[Session] = []


class SessionsReply(Message, tag="agents.sessions_reply", kw_only=True):
    sessions: list[Session]


class TaskReply(Message, tag="agents.task_reply", kw_only=True):
    task: Task
    runs: list[Run] = []


class TasksReply(Message, tag="agents.tasks_reply", kw_only=True):
    tasks: list[Task]


class RunReply(Message, tag="agents.run_reply", kw_only=True):
    run: Run


# -- capsule-bound sessions: the relay of a capsule's agent endpoint --------------------


class BindAgentCapsule(Request["AgentCapsuleBound"], tag="agents.capsule_bind", kw_only=True):
    """To ``vmmgr.<host>``: serve the capsule's agent endpoint for its bound session.

    vmmgr sets ``AGH_SESSION_ID``, ``AGH_AGENT`` and ``AGH_AGENT_URL`` in the
    environment of the capsule's later processes and relays each request of
    the endpoint to the gateway (:class:`RelayAgentRequest`) until the capsule
    is gone.
    """

    actor: Principal
    capsule_id: str
    session_id: str
    agent_name: str
    wait_s: float = 170.0
    """How long to wait for the capsule to run and its agent to answer (504 beyond)."""


class AgentCapsuleBound(Message, tag="agents.capsule_bound", kw_only=True):
    endpoint: str


class RelayAgentRequest(Request["RelayAgentReply"], tag="agents.relay", kw_only=True):
    """To ``gateway``: one request of code in ``capsule_id`` to ``/api/agent/*``, answered as
    the session bound to that capsule (the bus is the trust boundary: only vmmgr, which
    knows which capsule's channel it came from, sends this)."""

    capsule_id: str
    method: str
    path: str
    headers: dict[str, str] = {}
    body: bytes = b""


class RelayAgentReply(Message, tag="agents.relay_reply", kw_only=True):
    status: int
    content_type: str = "application/json"
    body: bytes = b""


AgentRequest = Union[  # noqa: UP007
    GetMe,
    GetContext,
    ListAgentChannels,
    SendMessage,
    ReplyMessage,
    ReceiveMessages,
    ClaimNext,
    ChangeLease,
    SpawnSession,
    GetSoul,
    ValidateSoul,
    GetCoordinatorConfig,
]
OperatorRequest = Union[  # noqa: UP007
    CreateWorkspace,
    ListWorkspaces,
    CreateSession,
    ListSessions,
    GetSession,
    StopSession,
    CreateTask,
    ListTasks,
    GetTask,
    QueueRun,
    GetRun,
    PutSoul,
    PutCoordinator,
]
AgentsReply = Union[  # noqa: UP007
    MeReply,
    ContextReply,
    ChannelsReply,
    MessageReply,
    MessagesReply,
    ClaimReply,
    LeaseReply,
    SpawnReply,
    SoulReply,
    CoordinatorReply,
    WorkspaceReply,
    WorkspacesReply,
    SessionCreated,
    SessionReply,
    SessionsReply,
    TaskReply,
    TasksReply,
    RunReply,
]

agent_request_decoder = msgspec.msgpack.Decoder(AgentRequest)
operator_request_decoder = msgspec.msgpack.Decoder(OperatorRequest)
reply_decoder = msgspec.msgpack.Decoder(AgentsReply)


FAMILY = Family("agents", __name__)
"""The agents messages and their one Decoder (define every message above this line)."""
