"""The agent runtime: ``/api/agent/*`` (agents) and ``/v1/agent/*`` (operators).

``/api/agent/*`` is the reference's API, unchanged but for one addition:
besides ``X-AGH-Session-ID`` / ``X-AGH-Agent`` (and optionally
``X-AGH-Workspace-ID``), a request proves who it is with ``Authorization:
Bearer <agent token>``, the token shown once when the session was created or
spawned. The gateway answers a request without the identity headers itself
(401 ``identity_required``); it hashes the token (the raw token goes no
further) and the agents service decides the rest
(``services/agents/identity.py``). Every refusal on these routes has the
reference's diagnostic shape (:class:`DiagnosticError`, documented as these
operations' error body; the app's own answers under ``/api/agent/`` — 405,
413, an unknown path — are rendered in it too)::

    {"error": "<message>", "diagnostic": {"id", "code", "severity", "category", "title",
     "message", "suggested_command", "data_freshness", "doc_url", "evidence"}}

``/v1/agent/*`` is Dovecote's operator surface (API key or session, like the
capsule routes; the capsules error shape). Both are route tables
(:mod:`dovecote.gateway.routing`): the request Struct both validates the body
and documents it, and the response is documented from the service's reply
type (its fields, without the bus tag).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from quart import Response, request

from dovecote.bus.messages import agents as m
from dovecote.gateway.calls import json_response, parse_body, refuse_nul
from dovecote.gateway.errors import ApiError, api_error
from dovecote.gateway.routing import Call, Family, Route, path_id, register_routes
from dovecote.gateway.schemas.accounts import Request
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import DovecoteError, ServiceError

SESSION_HEADER = "X-AGH-Session-ID"
AGENT_HEADER = "X-AGH-Agent"
WORKSPACE_HEADER = "X-AGH-Workspace-ID"
SERVICE = "agents"
RELAYED_CAPSULE = "dovecote.relayed_capsule"
"""ASGI scope key set only by the in-process relay of a capsule's agent endpoint (never from HTTP)."""
LONG_POLL_S = 25.0
MAX_ID = 64

Text = Annotated[str, msgspec.Meta(max_length=200)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID)]
Names = Annotated[
    list[Annotated[str, msgspec.Meta(min_length=1, max_length=256)]], msgspec.Meta(max_length=256)
]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=10_000_000)]

TITLES = {
    "identity_required": (
        "identity",
        "Agent identity required",
        f"send {SESSION_HEADER}, {AGENT_HEADER} and Authorization: Bearer <agent token>",
    ),
    "identity_stale": (
        "identity",
        "Agent session is not active",
        "create or spawn a new session: POST /v1/agent/sessions",
    ),
    "identity_mismatch": (
        "identity",
        "Agent name does not match the session",
        f"send the session's agent name in {AGENT_HEADER}",
    ),
    "identity_unauthorized": (
        "identity",
        "Session not authorized for this workspace",
        f"send the session's workspace in {WORKSPACE_HEADER}, or omit it",
    ),
    "identity_proof_required": (
        "identity",
        "Agent token required",
        "send Authorization: Bearer <agent token> (shown when the session was created)",
    ),
    "identity_proof_invalid": (
        "identity",
        "Agent token rejected",
        "send the token shown when this session was created or spawned",
    ),
    "service_unavailable": ("availability", "Agent runtime unavailable", "retry shortly"),
    "lease_expired": ("task_lease", "Lease expired", "claim again: POST /api/agent/tasks/claim-next"),
    "lease_not_active": (
        "task_lease",
        "Not an active lease",
        "claim again: POST /api/agent/tasks/claim-next",
    ),
}


class Diagnostic(msgspec.Struct, kw_only=True):
    """Why an agent request was refused, and what to do about it."""

    id: str
    code: str
    severity: str
    category: str
    title: str
    message: str
    suggested_command: str
    data_freshness: str
    doc_url: str
    evidence: dict[str, Any]


class DiagnosticError(msgspec.Struct, kw_only=True):
    """The agent runtime's error body: the message, and its diagnostic."""

    error: str
    diagnostic: Diagnostic


def _diagnostic(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    category, title, command = TITLES.get(
        code,
        (
            "spawn" if code.startswith(("max_", "permission")) else "request",
            code.replace("_", " ").capitalize(),
            "",
        ),
    )
    if status == 503:
        code, category = "identity_lookup_unavailable", "availability"
    body = DiagnosticError(
        error=message,
        diagnostic=Diagnostic(
            id="diag_" + secrets.token_hex(8),
            code=code,
            severity="error",
            category=category,
            title=title,
            message=message,
            suggested_command=command,
            data_freshness="live",
            doc_url="/openapi.json",
            evidence={**(details or {}), "status": status, "path": request.path},
        ),
    )
    return json_response(body, status)


async def _drain() -> None:
    """Read a small unread body, so the keep-alive connection stays usable after an early answer."""
    try:
        length = int(request.headers.get("Content-Length", "0") or 0)
        if 0 < length <= 1024 * 1024:
            await request.get_data(cache=False)
    except Exception:  # already read, or unreadable: nothing to keep
        pass


def _identity() -> m.AgentIdentity:
    sid = request.headers.get(SESSION_HEADER, "").strip()
    agent = request.headers.get(AGENT_HEADER, "").strip()
    capsule = str(request.scope.get(RELAYED_CAPSULE) or "")
    if capsule:  # relayed from a capsule's agent endpoint: the capsule is the proof (gateway/agent_relay.py)
        return m.AgentIdentity(session_id=sid[:MAX_ID], agent_name=agent[:200], capsule_id=capsule,
                               workspace_id=request.headers.get(WORKSPACE_HEADER, "").strip()[:MAX_ID])
    if not sid or not agent:
        raise ApiError(401, "identity_required", f"{SESSION_HEADER} and {AGENT_HEADER} are required")
    if len(sid) > MAX_ID or len(agent) > 200:
        raise ApiError(401, "identity_stale", "unknown agent session")
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    digest = (
        hashlib.sha256(token.strip().encode()).hexdigest() if scheme.lower() == "bearer" and token else ""
    )
    return m.AgentIdentity(
        session_id=sid,
        agent_name=agent,
        workspace_id=request.headers.get(WORKSPACE_HEADER, "").strip()[:MAX_ID],
        token_sha256=digest,
    )


def _plain(reply: msgspec.Struct) -> dict[str, Any]:
    """A reply's fields, without its bus tag."""
    return msgspec.structs.asdict(reply)


@functools.cache
def _doc(reply_type: type) -> type:
    """The JSON twin of a reply type (its fields, no bus tag), for the OpenAPI document."""
    fields = [
        (f.name, f.type) if f.required else (f.name, f.type, f.default)
        for f in msgspec.structs.fields(reply_type)
    ]
    return msgspec.defstruct(reply_type.__name__.removesuffix("Reply") + "Response", fields, kw_only=True)


# -- request bodies ------------------------------------------------------------------


class AgentBody(msgspec.Struct, kw_only=True):
    """Base of agent request bodies: fields this version does not know are skipped."""


class ClaimNextBody(AgentBody):
    lease_seconds: float | None = None
    wait: bool = False
    """Long-poll for claimable work (at most the service's bound, 25 s by default)."""
    wait_seconds: float | None = None


class HeartbeatBody(AgentBody):
    lease_seconds: float | None = None


class CompleteBody(AgentBody):
    result: Any = None


class FailBody(AgentBody):
    error: Annotated[str, msgspec.Meta(max_length=10_000)] | None = None


class ReleaseBody(AgentBody):
    reason: Annotated[str, msgspec.Meta(max_length=500)] | None = None


class SendBody(AgentBody):
    metadata: m.MessageMetadata
    body: Any = None
    to_session_id: Id | None = None
    idempotency_key: Text | None = None


class ReplyMetadata(AgentBody):
    correlation_id: Text | None = None
    ext: dict[str, Any] | None = None


class ReplyBody(AgentBody):
    reply_to_message_id: Id
    body: Any = None
    metadata: ReplyMetadata | None = None
    idempotency_key: Text | None = None


class PermissionsIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    mcp_servers: Names | None = None
    network_channels: Names | None = None
    sandbox_profiles: Names | None = None
    skills: Names | None = None
    tools: Names | None = None
    workspace_paths: Names | None = None


class SpawnBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Unknown fields are 422."""

    agent_name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    auto_stop_on_parent: bool = True
    permissions: PermissionsIn | None = None
    spawn_role: Annotated[str, msgspec.Meta(max_length=100)] = ""
    ttl_seconds: NonNegative | None = None
    idempotency_key: Text | None = None
    name: Text = ""
    capabilities: Names | None = None


class ValidateSoulBody(AgentBody):
    content: str | None = None
    body: str | None = None


class CreateWorkspaceBody(Request):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    root_dir: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class CreateSessionBody(Request):
    workspace_id: Id
    agent_name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    name: Text = ""
    channel: Text = ""
    provider: Text = ""
    model: Text = ""
    ttl_seconds: NonNegative | None = None
    capabilities: Names = []
    permissions: PermissionsIn | None = None
    capsule_template: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] | None = None
    """Bind the session to a new capsule of this template: code in it calls ``/api/agent/*`` at
    ``$AGH_AGENT_URL`` with no token; the capsule is destroyed when the session stops."""


class StopSessionBody(Request):
    detail: Annotated[str, msgspec.Meta(max_length=500)] = ""


class CreateTaskBody(Request):
    workspace_id: Id
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    description: Annotated[str, msgspec.Meta(max_length=20_000)] = ""
    priority: m.Priority = "medium"
    network_channel: Text = ""
    required_capabilities: Names = []


class QueueRunBody(Request):
    idempotency_key: Text | None = None
    network_channel: Text | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None


class PutSoulBody(Request):
    content: Annotated[str, msgspec.Meta(max_length=1024 * 1024)]


class PutCoordinatorBody(Request):
    workspace_id: Id
    enabled: bool = True
    agent_name: Text = ""
    provider: Text = ""
    model: Text = ""
    max_children: NonNegative | None = None
    max_depth: NonNegative | None = None
    max_active_sessions_per_workspace: NonNegative | None = None
    default_ttl_seconds: NonNegative | None = None


class SessionsQuery(msgspec.Struct, kw_only=True):
    workspace_id: str | None = None
    state: m.SessionState | None = None


class WorkspaceQuery(msgspec.Struct, kw_only=True):
    workspace_id: str | None = None


class RecvQuery(msgspec.Struct, kw_only=True):
    wait: bool | None = None
    """Wait for the next message when none is available (``true``, or a number of seconds)."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=200)] = 50


class CoordinatorQuery(msgspec.Struct, kw_only=True):
    workspace: str | None = None


def _policy(value: PermissionsIn | None) -> dict[str, list[str] | None] | None:
    return None if value is None else msgspec.structs.asdict(value)


def _path_id(value: str, what: str) -> str:
    return path_id(value, ApiError(404, f"{what}_not_found", f"no such {what}"))


def _wait_arg(raw: str | None) -> float:
    if raw is None or raw.strip().lower() in ("", "false", "0", "no"):
        return 0.0
    if raw.strip().lower() in ("true", "yes"):
        return LONG_POLL_S
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "invalid_request", "wait must be true, false or a number of seconds") from None
    if not 0 <= value <= 3600:
        raise ApiError(400, "invalid_request", "wait must be between 0 and 3600 seconds")
    return value


def _limit_arg(raw: str | None) -> int:
    try:
        value = int(raw) if raw is not None else 50
    except ValueError:
        raise ApiError(400, "invalid_request", "limit must be an integer") from None
    if not 1 <= value <= 200:
        raise ApiError(400, "invalid_request", "limit must be in 1..200")
    return value


async def _strict_parse(body_type: Any) -> Any:
    """The spawn body: an unknown field is 422 ``unknown_field``."""
    try:
        return await parse_body(body_type)
    except ApiError as exc:
        if "unknown field" in exc.message:
            raise ApiError(422, "unknown_field", exc.message) from None
        raise


async def _soul_body(body_type: Any) -> PutSoulBody:
    """A soul as ``text/*`` (markdown) or JSON ``{content}``."""
    if (request.mimetype or "").startswith("text/"):
        raw = await request.get_data(cache=False)
        try:
            content = raw if isinstance(raw, str) else raw.decode()
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_request", "the soul must be UTF-8 text") from None
        refuse_nul(content)
        return PutSoulBody(content=content)
    body: PutSoulBody = await parse_body(body_type)
    return body


def _diagnostic_errors(view: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Answer every refusal of an ``/api/agent/*`` view in the diagnostic shape."""

    @functools.wraps(view)
    async def wrapper(**kwargs: Any) -> Response:
        try:
            return await view(**kwargs)
        except DovecoteError as exc:
            err = exc if isinstance(exc, ServiceError) else api_error(exc, SERVICE)
            await _drain()
            return _diagnostic(err.status, err.code, err.message, err.details)

    return wrapper


async def _ask(c: Call, message: m.Message, timeout_s: float) -> Any:
    """Ask the agents service; a refusal is raised as it came (with its details)."""
    return await c.state.bus.request(SERVICE, message, timeout=timeout_s)


def _idempotency_key(value: str | None) -> str | None:
    key = value or request.headers.get("Idempotency-Key") or None
    return key[:201] if key else None


def _claim_wait(c: Call) -> float:
    body: ClaimNextBody = c.body
    wait = body.wait_seconds if body.wait_seconds is not None else (LONG_POLL_S if body.wait else 0.0)
    if not 0 <= wait <= 3600:
        raise ApiError(400, "invalid_request", "wait_seconds must be between 0 and 3600")
    return wait


def _receive(c: Call, wait: float, limit: int) -> m.ReceiveMessages:
    return m.ReceiveMessages(identity=c.actor, channel_id=_path_id(c.params["channel"], "channel"),
                             wait_s=wait, limit=limit)


def _lease(action: m.LeaseAction, **fields: Callable[[Any], Any]) -> Callable[[Call], m.ChangeLease]:
    """A ``ChangeLease`` builder: ``fields`` read the body."""
    return lambda c: m.ChangeLease(
        identity=c.actor, run_id=_path_id(c.params["run_id"], "run"), action=action,
        **{name: read(c.body) for name, read in fields.items()})


AGENT = Family(tags=["agent"], service=SERVICE, auth=_identity, send=_ask, encode=_plain,
               document=_doc, wrap=_diagnostic_errors, error=DiagnosticError)
"""``/api/agent/*``: identity headers first, diagnostic errors, replies without their bus tag."""

OPERATOR = Family(tags=["agent-operator"], service=SERVICE,
                  encode=lambda reply: reply if isinstance(reply, dict) else _plain(reply),
                  document=_doc)
"""``/v1/agent/*``: API key or session, the platform's errors."""

AGENT_ROUTES = [
    Route(method="GET", path="/api/agent/me", name="agent_me",
          summary="The calling agent session, its workspace, leases and limits",
          response=m.MeReply, message=lambda c: m.GetMe(identity=c.actor)),
    Route(method="GET", path="/api/agent/context", name="agent_context",
          summary="The agent's assembled context", response=m.ContextReply,
          message=lambda c: m.GetContext(identity=c.actor)),
    Route(method="GET", path="/api/agent/coordinator/config", name="agent_coordinator_config",
          summary="The workspace's coordinator settings", response=m.CoordinatorReply,
          query=CoordinatorQuery, parse_query=False,
          message=lambda c: m.GetCoordinatorConfig(
              identity=c.actor, workspace=request.args.get("workspace", "")[:1024])),
    Route(method="GET", path="/api/agent/soul", name="agent_soul",
          summary="The agent's soul document", response=m.Soul,
          message=lambda c: m.GetSoul(identity=c.actor), reply=lambda reply: reply.soul),
    Route(method="POST", path="/api/agent/soul/validate", name="agent_soul_validate",
          summary="Validate a soul document (the stored one when empty)",
          request=ValidateSoulBody, response=m.Soul, reply=lambda reply: reply.soul,
          message=lambda c: m.ValidateSoul(
              identity=c.actor, content=c.body.content if c.body.content is not None else c.body.body)),
    Route(method="POST", path="/api/agent/spawn", name="agent_spawn",
          summary="Spawn a child agent session", request=SpawnBody, parse=_strict_parse,
          response=m.SpawnReply, status=201,
          message=lambda c: m.SpawnSession(
              identity=c.actor, agent_name=c.body.agent_name,
              auto_stop_on_parent=c.body.auto_stop_on_parent,
              permissions=_policy(c.body.permissions), spawn_role=c.body.spawn_role,
              ttl_seconds=c.body.ttl_seconds, idempotency_key=c.body.idempotency_key,
              name=c.body.name, capabilities=c.body.capabilities),
          timeout_s=320.0),  # a sandbox_profiles entry naming a template waits for the child's capsule
    Route(method="GET", path="/api/agent/channels", name="agent_channels",
          summary="Coordination channels of the agent's workspace", response=m.ChannelsReply,
          message=lambda c: m.ListAgentChannels(identity=c.actor)),
    Route(method="POST", path="/api/agent/channels/{channel}/send", name="agent_channel_send", fast=True,
          summary="Send a message on a coordination channel", request=SendBody,
          response=m.MessageReply, status=202,
          message=lambda c: m.SendMessage(
              identity=c.actor, channel_id=_path_id(c.params["channel"], "channel"),
              metadata=c.body.metadata, body=c.body.body, to_session_id=c.body.to_session_id,
              idempotency_key=_idempotency_key(c.body.idempotency_key))),
    Route(method="POST", path="/api/agent/channels/reply", name="agent_channel_reply",
          summary="Reply to a message (its metadata, kind reply)", request=ReplyBody,
          response=m.MessageReply, status=202,
          message=lambda c: m.ReplyMessage(
              identity=c.actor, reply_to_message_id=c.body.reply_to_message_id, body=c.body.body,
              correlation_id=(c.body.metadata or ReplyMetadata()).correlation_id,
              ext=(c.body.metadata or ReplyMetadata()).ext,
              idempotency_key=_idempotency_key(c.body.idempotency_key))),
    Route(method="GET", path="/api/agent/channels/{channel}/recv", name="agent_channel_recv", fast=True,
          summary="Receive unread messages (long poll with wait)", response=m.MessagesReply,
          query=RecvQuery, parse_query=False,
          message=lambda c: _receive(c, _wait_arg(request.args.get("wait")),
                                     _limit_arg(request.args.get("limit"))),
          timeout_s=lambda c: min(_wait_arg(request.args.get("wait")), 3600) + 10),
    Route(method="POST", path="/api/agent/tasks/claim-next", name="agent_claim_next", fast=True,
          summary="Claim the best queued run (204 when none)", request=ClaimNextBody,
          response=m.ClaimReply, responses={204: None},
          message=lambda c: m.ClaimNext(identity=c.actor, lease_seconds=c.body.lease_seconds,
                                        wait_s=_claim_wait(c)),
          timeout_s=lambda c: _claim_wait(c) + 10,
          reply=lambda reply: Response(b"", status=204) if reply.claim is None else _plain(reply)),
    Route(method="POST", path="/api/agent/tasks/{run_id}/heartbeat", name="agent_heartbeat", fast=True,
          summary="Extend the lease", request=HeartbeatBody, response=m.LeaseReply,
          message=_lease("heartbeat", lease_seconds=lambda b: b.lease_seconds)),
    Route(method="POST", path="/api/agent/tasks/{run_id}/complete", name="agent_complete", fast=True,
          summary="Complete the run", request=CompleteBody, response=m.LeaseReply,
          message=_lease("complete", result=lambda b: b.result)),
    Route(method="POST", path="/api/agent/tasks/{run_id}/fail", name="agent_fail", fast=True,
          summary="Fail the run", request=FailBody, response=m.LeaseReply,
          message=_lease("fail", error=lambda b: b.error)),
    Route(method="POST", path="/api/agent/tasks/{run_id}/release", name="agent_release", fast=True,
          summary="Release the lease (the run is queued again)", request=ReleaseBody,
          response=m.LeaseReply, message=_lease("release", reason=lambda b: b.reason)),
]

OPERATOR_ROUTES = [
    Route(method="POST", path="/v1/agent/workspaces", name="create_agent_workspace",
          summary="Create an agent workspace", request=CreateWorkspaceBody,
          response=m.WorkspaceReply, status=201,
          message=lambda c: m.CreateWorkspace(actor=c.actor, name=c.body.name, root_dir=c.body.root_dir)),
    Route(method="GET", path="/v1/agent/workspaces", name="list_agent_workspaces",
          summary="List agent workspaces", response=m.WorkspacesReply,
          message=lambda c: m.ListWorkspaces(actor=c.actor)),
    Route(method="POST", path="/v1/agent/sessions", name="create_agent_session",
          summary="Create an agent session (its token is shown once)", request=CreateSessionBody,
          response=m.SessionCreated, status=201,
          message=lambda c: m.CreateSession(
              actor=c.actor, workspace_id=c.body.workspace_id, agent_name=c.body.agent_name,
              name=c.body.name, channel=c.body.channel, provider=c.body.provider,
              model=c.body.model, ttl_seconds=c.body.ttl_seconds,
              capabilities=c.body.capabilities, permissions=_policy(c.body.permissions),
              capsule_template=c.body.capsule_template),
          timeout_s=lambda c: 10.0 if c.body.capsule_template is None else 320.0),
    Route(method="GET", path="/v1/agent/sessions", name="list_agent_sessions",
          summary="List agent sessions", response=m.SessionsReply, query=SessionsQuery,
          parse_query=False,
          message=lambda c: m.ListSessions(
              actor=c.actor, workspace_id=request.args.get("workspace_id", "")[:MAX_ID],
              state=request.args.get("state", "")[:20])),
    Route(method="GET", path="/v1/agent/sessions/{id}", name="get_agent_session",
          summary="Get an agent session with its lineage and children", response=m.SessionReply,
          message=lambda c: m.GetSession(actor=c.actor, session_id=_path_id(c.params["id"], "session"))),
    Route(method="POST", path="/v1/agent/sessions/{id}/stop", name="stop_agent_session",
          summary="Stop an agent session and its auto-stop descendants", request=StopSessionBody,
          optional_body=True, response=m.SessionReply,
          message=lambda c: m.StopSession(
              actor=c.actor, session_id=_path_id(c.params["id"], "session"), detail=c.body.detail)),
    Route(method="POST", path="/v1/agent/tasks", name="create_agent_task", summary="Create a task",
          request=CreateTaskBody, response=m.TaskReply, status=201,
          # the documented TaskReply: the task and its runs (none yet)
          message=lambda c: m.CreateTask(
              actor=c.actor, workspace_id=c.body.workspace_id, title=c.body.title,
              description=c.body.description, priority=c.body.priority,
              network_channel=c.body.network_channel,
              required_capabilities=c.body.required_capabilities)),
    Route(method="GET", path="/v1/agent/tasks", name="list_agent_tasks", summary="List tasks",
          response=m.TasksReply, query=WorkspaceQuery, parse_query=False,
          message=lambda c: m.ListTasks(
              actor=c.actor, workspace_id=request.args.get("workspace_id", "")[:MAX_ID])),
    Route(method="GET", path="/v1/agent/tasks/{id}", name="get_agent_task",
          summary="Get a task and its runs", response=m.TaskReply,
          message=lambda c: m.GetTask(actor=c.actor, task_id=_path_id(c.params["id"], "task"))),
    Route(method="POST", path="/v1/agent/tasks/{id}/runs", name="queue_agent_run",
          summary="Queue a run of the task", request=QueueRunBody, optional_body=True,
          response=m.RunReply, status=201,
          message=lambda c: m.QueueRun(
              actor=c.actor, task_id=_path_id(c.params["id"], "task"),
              idempotency_key=c.body.idempotency_key, network_channel=c.body.network_channel,
              max_attempts=c.body.max_attempts)),
    Route(method="GET", path="/v1/agent/runs/{id}", name="get_agent_run", summary="Get a run",
          response=m.RunReply,
          message=lambda c: m.GetRun(actor=c.actor, run_id=_path_id(c.params["id"], "run"))),
    Route(method="PUT", path="/v1/agent/souls/{agent_name}", name="put_agent_soul",
          summary="Store an agent's soul (markdown with front matter; text/markdown or JSON {content})",
          request=PutSoulBody, parse=_soul_body, response=m.SoulReply,
          message=lambda c: m.PutSoul(actor=c.actor, agent_name=c.params["agent_name"][:200],
                                      content=c.body.content)),
    Route(method="PUT", path="/v1/agent/coordinator", name="put_agent_coordinator",
          summary="Set a workspace's coordinator settings", request=PutCoordinatorBody,
          response=m.CoordinatorReply,
          message=lambda c: m.PutCoordinator(
              actor=c.actor, workspace_id=c.body.workspace_id, enabled=c.body.enabled,
              agent_name=c.body.agent_name, provider=c.body.provider, model=c.body.model,
              max_children=c.body.max_children, max_depth=c.body.max_depth,
              max_active_sessions_per_workspace=c.body.max_active_sessions_per_workspace,
              default_ttl_seconds=c.body.default_ttl_seconds)),
]


def register(state: GatewayState) -> None:
    """Add the agent runtime routes (the two tables above)."""
    state.api.error_shape("/api/agent/", _diagnostic)
    register_routes(state, AGENT, AGENT_ROUTES)
    register_routes(state, OPERATOR, OPERATOR_ROUTES)
