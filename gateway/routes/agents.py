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
capsule routes; the capsules error shape). Routes are declared once with
:func:`_route`: the request Struct both validates the body and documents it,
and the response is documented from the service's reply type.
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
from dovecote.gateway.calls import call, json_response, parse_body, refuse_nul
from dovecote.gateway.errors import ApiError, api_error
from dovecote.gateway.schemas.accounts import Request
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import DovecoteError, ServiceError

SESSION_HEADER = "X-AGH-Session-ID"
AGENT_HEADER = "X-AGH-Agent"
WORKSPACE_HEADER = "X-AGH-Workspace-ID"
SERVICE = "agents"
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
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise ApiError(404, f"{what}_not_found", f"no such {what}")
    return value


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


async def _spawn_body() -> SpawnBody:
    try:
        return await parse_body(SpawnBody)
    except ApiError as exc:
        if "unknown field" in exc.message:
            raise ApiError(422, "unknown_field", exc.message) from None
        raise


def register(state: GatewayState) -> None:
    """Add the agent runtime routes."""
    api, app, edge = state.api, state.app, state.edge
    api.error_shape("/api/agent/", _diagnostic)

    def agent_route(
        method: str,
        path: str,
        summary: str,
        *,
        body: type | None = None,
        reply: type | None = None,
        status: int = 200,
        query: Any = None,
        extra: dict[int, Any] | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Response]]]:
        """An ``/api/agent/*`` route: identity first, the body parsed into ``body``, diagnostic errors."""

        def decorate(view: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Response]]:
            @functools.wraps(view)
            async def wrapper(**kwargs: Any) -> Response:
                try:
                    ident = _identity()
                    if body is SpawnBody:
                        kwargs["body"] = await _spawn_body()
                    elif body is not None:
                        kwargs["body"] = await parse_body(body)
                    result = await view(ident, **kwargs)
                except DovecoteError as exc:
                    err = exc if isinstance(exc, ServiceError) else api_error(exc, SERVICE)
                    await _drain()
                    return _diagnostic(err.status, err.code, err.message, err.details)
                if isinstance(result, Response):
                    return result
                return json_response(_plain(result), status)

            responses = {status: _doc(reply) if reply is not None else None, **(extra or {})}
            api.route(
                app,
                method,
                path,
                summary=summary,
                tags=["agent"],
                request=body,
                responses=responses,
                security=False,
                query=query,
                error=DiagnosticError,
            )(wrapper)
            return wrapper

        return decorate

    def operator_route(
        method: str,
        path: str,
        summary: str,
        *,
        body: type | None = None,
        reply: type | None = None,
        status: int = 200,
        query: Any = None,
        optional_body: bool = False,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Response]]]:
        """A ``/v1/agent/*`` route: API key or session, the body parsed into ``body``."""

        def decorate(view: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Response]]:
            @functools.wraps(view)
            async def wrapper(**kwargs: Any) -> Response:
                actor = await edge.authenticate()
                if body is not None:
                    if (
                        optional_body
                        and not request.content_length
                        and "chunked" not in request.headers.get("Transfer-Encoding", "")
                    ):
                        kwargs["body"] = msgspec.convert({}, body)
                    else:
                        kwargs["body"] = await parse_body(body)
                result = await view(actor, **kwargs)
                return json_response(result if isinstance(result, dict) else _plain(result), status)

            api.route(
                app,
                method,
                path,
                summary=summary,
                tags=["agent-operator"],
                request=body,
                responses={status: _doc(reply) if reply is not None else None},
                query=query,
            )(wrapper)
            return wrapper

        return decorate

    async def ask(message: m.Message, timeout_s: float = 10.0) -> Any:
        """Ask the agents service; a refusal is raised as it came (with its details)."""
        return await state.bus.request(SERVICE, message, timeout=timeout_s)

    async def ask_operator(message: m.Message) -> Any:
        return await call(state, SERVICE, message)

    # -- /api/agent/* ------------------------------------------------------------------

    @agent_route(
        "GET", "/api/agent/me", "The calling agent session, its workspace, leases and limits", reply=m.MeReply
    )
    async def agent_me(ident: m.AgentIdentity) -> Any:
        return await ask(m.GetMe(identity=ident))

    @agent_route("GET", "/api/agent/context", "The agent's assembled context", reply=m.ContextReply)
    async def agent_context(ident: m.AgentIdentity) -> Any:
        return await ask(m.GetContext(identity=ident))

    @agent_route(
        "GET",
        "/api/agent/coordinator/config",
        "The workspace's coordinator settings",
        reply=m.CoordinatorReply,
        query=CoordinatorQuery,
    )
    async def agent_coordinator_config(ident: m.AgentIdentity) -> Any:
        workspace = request.args.get("workspace", "")[:1024]
        return await ask(m.GetCoordinatorConfig(identity=ident, workspace=workspace))

    @agent_route("GET", "/api/agent/soul", "The agent's soul document", reply=m.Soul)
    async def agent_soul(ident: m.AgentIdentity) -> Any:
        reply = await ask(m.GetSoul(identity=ident))
        return json_response(reply.soul)

    @agent_route(
        "POST",
        "/api/agent/soul/validate",
        "Validate a soul document (the stored one when empty)",
        body=ValidateSoulBody,
        reply=m.Soul,
    )
    async def agent_soul_validate(ident: m.AgentIdentity, body: ValidateSoulBody) -> Any:
        content = body.content if body.content is not None else body.body
        reply = await ask(m.ValidateSoul(identity=ident, content=content))
        return json_response(reply.soul)

    @agent_route(
        "POST",
        "/api/agent/spawn",
        "Spawn a child agent session",
        body=SpawnBody,
        reply=m.SpawnReply,
        status=201,
    )
    async def agent_spawn(ident: m.AgentIdentity, body: SpawnBody) -> Any:
        return await ask(
            m.SpawnSession(
                identity=ident,
                agent_name=body.agent_name,
                auto_stop_on_parent=body.auto_stop_on_parent,
                permissions=_policy(body.permissions),
                spawn_role=body.spawn_role,
                ttl_seconds=body.ttl_seconds,
                idempotency_key=body.idempotency_key,
                name=body.name,
                capabilities=body.capabilities,
            )
        )

    @agent_route(
        "GET", "/api/agent/channels", "Coordination channels of the agent's workspace", reply=m.ChannelsReply
    )
    async def agent_channels(ident: m.AgentIdentity) -> Any:
        return await ask(m.ListAgentChannels(identity=ident))

    @agent_route(
        "POST",
        "/api/agent/channels/{channel}/send",
        "Send a message on a coordination channel",
        body=SendBody,
        reply=m.MessageReply,
        status=202,
    )
    async def agent_channel_send(ident: m.AgentIdentity, body: SendBody, channel: str) -> Any:
        key = body.idempotency_key or request.headers.get("Idempotency-Key") or None
        return await ask(
            m.SendMessage(
                identity=ident,
                channel_id=_path_id(channel, "channel"),
                metadata=body.metadata,
                body=body.body,
                to_session_id=body.to_session_id,
                idempotency_key=key[:201] if key else None,
            )
        )

    @agent_route(
        "POST",
        "/api/agent/channels/reply",
        "Reply to a message (its metadata, kind reply)",
        body=ReplyBody,
        reply=m.MessageReply,
        status=202,
    )
    async def agent_channel_reply(ident: m.AgentIdentity, body: ReplyBody) -> Any:
        md = body.metadata or ReplyMetadata()
        key = body.idempotency_key or request.headers.get("Idempotency-Key") or None
        return await ask(
            m.ReplyMessage(
                identity=ident,
                reply_to_message_id=body.reply_to_message_id,
                body=body.body,
                correlation_id=md.correlation_id,
                ext=md.ext,
                idempotency_key=key[:201] if key else None,
            )
        )

    @agent_route(
        "GET",
        "/api/agent/channels/{channel}/recv",
        "Receive unread messages (long poll with wait)",
        reply=m.MessagesReply,
        query=RecvQuery,
    )
    async def agent_channel_recv(ident: m.AgentIdentity, channel: str) -> Any:
        wait = _wait_arg(request.args.get("wait"))
        limit = _limit_arg(request.args.get("limit"))
        return await ask(
            m.ReceiveMessages(
                identity=ident, channel_id=_path_id(channel, "channel"), wait_s=wait, limit=limit
            ),
            timeout_s=min(wait, 3600) + 10,
        )

    @agent_route(
        "POST",
        "/api/agent/tasks/claim-next",
        "Claim the best queued run (204 when none)",
        body=ClaimNextBody,
        reply=m.ClaimReply,
        extra={204: None},
    )
    async def agent_claim_next(ident: m.AgentIdentity, body: ClaimNextBody) -> Any:
        wait = body.wait_seconds if body.wait_seconds is not None else (LONG_POLL_S if body.wait else 0.0)
        if not 0 <= wait <= 3600:
            raise ApiError(400, "invalid_request", "wait_seconds must be between 0 and 3600")
        reply = await ask(
            m.ClaimNext(identity=ident, lease_seconds=body.lease_seconds, wait_s=wait), timeout_s=wait + 10
        )
        if reply.claim is None:
            return Response(b"", status=204)
        return reply

    @agent_route(
        "POST",
        "/api/agent/tasks/{run_id}/heartbeat",
        "Extend the lease",
        body=HeartbeatBody,
        reply=m.LeaseReply,
    )
    async def agent_heartbeat(ident: m.AgentIdentity, body: HeartbeatBody, run_id: str) -> Any:
        return await ask(
            m.ChangeLease(
                identity=ident,
                run_id=_path_id(run_id, "run"),
                action="heartbeat",
                lease_seconds=body.lease_seconds,
            )
        )

    @agent_route(
        "POST",
        "/api/agent/tasks/{run_id}/complete",
        "Complete the run",
        body=CompleteBody,
        reply=m.LeaseReply,
    )
    async def agent_complete(ident: m.AgentIdentity, body: CompleteBody, run_id: str) -> Any:
        return await ask(
            m.ChangeLease(
                identity=ident, run_id=_path_id(run_id, "run"), action="complete", result=body.result
            )
        )

    @agent_route("POST", "/api/agent/tasks/{run_id}/fail", "Fail the run", body=FailBody, reply=m.LeaseReply)
    async def agent_fail(ident: m.AgentIdentity, body: FailBody, run_id: str) -> Any:
        return await ask(
            m.ChangeLease(identity=ident, run_id=_path_id(run_id, "run"), action="fail", error=body.error)
        )

    @agent_route(
        "POST",
        "/api/agent/tasks/{run_id}/release",
        "Release the lease (the run is queued again)",
        body=ReleaseBody,
        reply=m.LeaseReply,
    )
    async def agent_release(ident: m.AgentIdentity, body: ReleaseBody, run_id: str) -> Any:
        return await ask(
            m.ChangeLease(
                identity=ident, run_id=_path_id(run_id, "run"), action="release", reason=body.reason
            )
        )

    # -- /v1/agent/* -------------------------------------------------------------------

    @operator_route(
        "POST",
        "/v1/agent/workspaces",
        "Create an agent workspace",
        body=CreateWorkspaceBody,
        reply=m.WorkspaceReply,
        status=201,
    )
    async def create_agent_workspace(actor: m.Principal, body: CreateWorkspaceBody) -> Any:
        return await ask_operator(m.CreateWorkspace(actor=actor, name=body.name, root_dir=body.root_dir))

    @operator_route("GET", "/v1/agent/workspaces", "List agent workspaces", reply=m.WorkspacesReply)
    async def list_agent_workspaces(actor: m.Principal) -> Any:
        return await ask_operator(m.ListWorkspaces(actor=actor))

    @operator_route(
        "POST",
        "/v1/agent/sessions",
        "Create an agent session (its token is shown once)",
        body=CreateSessionBody,
        reply=m.SessionCreated,
        status=201,
    )
    async def create_agent_session(actor: m.Principal, body: CreateSessionBody) -> Any:
        return await ask_operator(
            m.CreateSession(
                actor=actor,
                workspace_id=body.workspace_id,
                agent_name=body.agent_name,
                name=body.name,
                channel=body.channel,
                provider=body.provider,
                model=body.model,
                ttl_seconds=body.ttl_seconds,
                capabilities=body.capabilities,
                permissions=_policy(body.permissions),
            )
        )

    @operator_route(
        "GET", "/v1/agent/sessions", "List agent sessions", reply=m.SessionsReply, query=SessionsQuery
    )
    async def list_agent_sessions(actor: m.Principal) -> Any:
        return await ask_operator(
            m.ListSessions(
                actor=actor,
                workspace_id=request.args.get("workspace_id", "")[:MAX_ID],
                state=request.args.get("state", "")[:20],
            )
        )

    @operator_route(
        "GET",
        "/v1/agent/sessions/{id}",
        "Get an agent session with its lineage and children",
        reply=m.SessionReply,
    )
    async def get_agent_session(actor: m.Principal, id: str) -> Any:
        return await ask_operator(m.GetSession(actor=actor, session_id=_path_id(id, "session")))

    @operator_route(
        "POST",
        "/v1/agent/sessions/{id}/stop",
        "Stop an agent session and its auto-stop descendants",
        body=StopSessionBody,
        reply=m.SessionReply,
        optional_body=True,
    )
    async def stop_agent_session(actor: m.Principal, id: str, body: StopSessionBody) -> Any:
        return await ask_operator(
            m.StopSession(actor=actor, session_id=_path_id(id, "session"), detail=body.detail)
        )

    @operator_route(
        "POST", "/v1/agent/tasks", "Create a task", body=CreateTaskBody, reply=m.TaskReply, status=201
    )
    async def create_agent_task(actor: m.Principal, body: CreateTaskBody) -> Any:
        reply = await ask_operator(
            m.CreateTask(
                actor=actor,
                workspace_id=body.workspace_id,
                title=body.title,
                description=body.description,
                priority=body.priority,
                network_channel=body.network_channel,
                required_capabilities=body.required_capabilities,
            )
        )
        return reply  # the documented TaskReply: the task and its runs (none yet)

    @operator_route("GET", "/v1/agent/tasks", "List tasks", reply=m.TasksReply, query=WorkspaceQuery)
    async def list_agent_tasks(actor: m.Principal) -> Any:
        return await ask_operator(
            m.ListTasks(actor=actor, workspace_id=request.args.get("workspace_id", "")[:MAX_ID])
        )

    @operator_route("GET", "/v1/agent/tasks/{id}", "Get a task and its runs", reply=m.TaskReply)
    async def get_agent_task(actor: m.Principal, id: str) -> Any:
        return await ask_operator(m.GetTask(actor=actor, task_id=_path_id(id, "task")))

    @operator_route(
        "POST",
        "/v1/agent/tasks/{id}/runs",
        "Queue a run of the task",
        body=QueueRunBody,
        reply=m.RunReply,
        status=201,
        optional_body=True,
    )
    async def queue_agent_run(actor: m.Principal, id: str, body: QueueRunBody) -> Any:
        return await ask_operator(
            m.QueueRun(
                actor=actor,
                task_id=_path_id(id, "task"),
                idempotency_key=body.idempotency_key,
                network_channel=body.network_channel,
                max_attempts=body.max_attempts,
            )
        )

    @operator_route("GET", "/v1/agent/runs/{id}", "Get a run", reply=m.RunReply)
    async def get_agent_run(actor: m.Principal, id: str) -> Any:
        return await ask_operator(m.GetRun(actor=actor, run_id=_path_id(id, "run")))

    @operator_route(
        "PUT",
        "/v1/agent/souls/{agent_name}",
        "Store an agent's soul (markdown with front matter; text/markdown or JSON {content})",
        reply=m.SoulReply,
    )
    async def put_agent_soul(actor: m.Principal, agent_name: str) -> Any:
        if (request.mimetype or "").startswith("text/"):
            raw = await request.get_data(cache=False)
            try:
                content = raw if isinstance(raw, str) else raw.decode()
            except UnicodeDecodeError:
                raise ApiError(400, "invalid_request", "the soul must be UTF-8 text") from None
            refuse_nul(content)
        else:
            content = (await parse_body(PutSoulBody)).content
        return await ask_operator(m.PutSoul(actor=actor, agent_name=agent_name[:200], content=content))

    @operator_route(
        "PUT",
        "/v1/agent/coordinator",
        "Set a workspace's coordinator settings",
        body=PutCoordinatorBody,
        reply=m.CoordinatorReply,
    )
    async def put_agent_coordinator(actor: m.Principal, body: PutCoordinatorBody) -> Any:
        return await ask_operator(
            m.PutCoordinator(
                actor=actor,
                workspace_id=body.workspace_id,
                enabled=body.enabled,
                agent_name=body.agent_name,
                provider=body.provider,
                model=body.model,
                max_children=body.max_children,
                max_depth=body.max_depth,
                max_active_sessions_per_workspace=body.max_active_sessions_per_workspace,
                default_ttl_seconds=body.default_ttl_seconds,
            )
        )
