"""Messages of the browsers service (``/browser/api/sessions*``: the browser sessions reference).

The wire shapes of the reference (camelCase field names, the status enum) are
the Structs here, shared by the gateway (which decodes HTTP bodies and queries
into them, so a bad value is a 400 before anything reaches the service) and
the service (which fills them). Two families:

* :data:`BrowserRequest`: requests to the ``browsers`` service, each declaring
  its reply. Refusals are :class:`~dovecote.libs.errors.ServiceError` (an
  unknown or another team's session is 404 ``session_not_found``).
* :class:`OpenCdp`: the start message of a bus stream carrying one DevTools
  protocol connection. After the worker's :class:`CdpReady`, each ``bytes``
  frame either way is one CDP JSON message (caller → browser commands,
  browser → caller responses and events), in order, with the bus's credit
  flow control; either side's EOF ends the connection.

Schema evolution: new fields get defaults, annotations never change.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

from .base import Family, Message, Request
from .common import Principal

STATUSES = ("creating", "running", "completed", "failed", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")
Status = Literal["creating", "running", "completed", "failed", "cancelled"]

SessionId = Annotated[str, msgspec.Meta(pattern=r"^session-[0-9a-f]{16}$")]
Limit = Annotated[int, msgspec.Meta(ge=1, le=100)]
ActionLimit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Offset = Annotated[int, msgspec.Meta(ge=0, le=10_000_000)]
Dimension = Annotated[int, msgspec.Meta(ge=200, le=4096)]
Prompt = Annotated[str, msgspec.Meta(min_length=1, max_length=10_000)]


# -- request bodies (decoded by the gateway) -----------------------------------------


class Viewport(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    width: Dimension = 1280
    height: Dimension = 800


class CreateOptions(msgspec.Struct, kw_only=True):
    browser: Literal["chromium"] = "chromium"
    viewport: Viewport = msgspec.field(default_factory=Viewport)
    recording: Literal["screenshots", "video", "off"] = "screenshots"
    """``screenshots`` (default): the sparse timeline; ``video``: also a WebM (not built yet)."""


class CreateBody(msgspec.Struct, kw_only=True):
    initialPrompt: Prompt | None = None
    options: CreateOptions = msgspec.field(default_factory=CreateOptions)


class ListQuery(msgspec.Struct, kw_only=True):
    limit: Limit = 30
    offset: Offset = 0
    includeTerminated: bool = False


class ActionsQuery(msgspec.Struct, kw_only=True):
    offset: Offset = 0
    limit: ActionLimit = 100


# -- shapes of the reference -----------------------------------------------------------


class Created(msgspec.Struct, kw_only=True):
    sessionId: str
    status: Status
    machineId: str


class SessionError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class Navigation(msgspec.Struct, kw_only=True):
    url: str
    timestamp: str
    title: str | None = None


class SessionSummary(msgspec.Struct, kw_only=True):
    sessionId: str
    status: Status
    currentUrl: str | None
    createdAt: str
    navigationCount: int


class SessionDetail(msgspec.Struct, kw_only=True):
    sessionId: str
    status: Status
    machineId: str
    currentUrl: str | None
    title: str | None
    actionCount: int
    screenshotCount: int
    duration: int
    """Milliseconds since creation (until the end for a terminated session)."""
    createdAt: str
    startedAt: str | None = None
    endedAt: str | None = None
    connectUrl: str | None = None
    """The DevTools WebSocket (with a short-lived token); only while ``running``."""
    navigationHistory: list[Navigation] = []
    initialPrompt: str | None = None
    viewport: Viewport = msgspec.field(default_factory=Viewport)
    provider: str = "host"
    isolation: str = ""
    error: SessionError | None = None
    statusHistory: list[dict[str, str]] = []


class SessionPage(msgspec.Struct, kw_only=True):
    sessions: list[SessionSummary]
    total: int
    hasMore: bool


class Cost(msgspec.Struct, kw_only=True):
    tokens: int = 0
    price: float = 0.0


class Action(msgspec.Struct, kw_only=True):
    type: str
    timestamp: str
    success: bool
    details: dict[str, Any]
    duration: int
    cost: Cost = msgspec.field(default_factory=Cost)
    source: str = "cdp"
    """``cdp`` (a client over the DevTools WebSocket), ``planner`` or ``system``."""


class ActionPage(msgspec.Struct, kw_only=True):
    actions: list[Action]
    total: int


class Artifact(msgspec.Struct, kw_only=True):
    objectId: str
    type: str
    publicUrl: str
    timestamp: str


class ArtifactList(msgspec.Struct, kw_only=True):
    artifacts: list[Artifact]


class ConsoleEntry(msgspec.Struct, kw_only=True):
    level: str
    message: str
    timestamp: str


class ConsoleLog(msgspec.Struct, kw_only=True):
    logs: list[ConsoleEntry]


class NetworkEntry(msgspec.Struct, kw_only=True):
    url: str
    method: str
    status: int | None
    duration: int | None
    size: int | None
    type: str | None = None
    error: str | None = None


class NetworkLog(msgspec.Struct, kw_only=True):
    requests: list[NetworkEntry]


class SessionHealth(msgspec.Struct, kw_only=True):
    status: Literal["healthy", "unhealthy"]
    sessionState: Status
    browserResponsive: bool
    currentUrl: str | None
    uptimeMs: int


class Terminated(msgspec.Struct, kw_only=True):
    success: bool
    message: str


# -- replies -----------------------------------------------------------------------------


class CreatedReply(Message, tag="browsers.created", kw_only=True):
    created: Created


class DetailReply(Message, tag="browsers.detail", kw_only=True):
    session: SessionDetail
    cdp_token: str | None = None
    """A short-lived token for ``connectUrl`` (the gateway builds the URL)."""


class PageReply(Message, tag="browsers.page", kw_only=True):
    page: SessionPage


class TerminatedReply(Message, tag="browsers.terminated", kw_only=True):
    result: Terminated


class ActionsReply(Message, tag="browsers.actions", kw_only=True):
    page: ActionPage


class ArtifactsReply(Message, tag="browsers.artifacts", kw_only=True):
    artifacts: list[Artifact]


class ConsoleReply(Message, tag="browsers.console", kw_only=True):
    logs: list[ConsoleEntry]


class NetworkReply(Message, tag="browsers.network", kw_only=True):
    requests: list[NetworkEntry]


class HealthReply(Message, tag="browsers.health_reply", kw_only=True):
    health: SessionHealth


class DiscoveryReply(Message, tag="browsers.discovery", kw_only=True):
    version: dict[str, str]
    """``Browser``, ``Protocol-Version``, ``User-Agent``, ``V8-Version``... of the browser."""
    targets: list[dict[str, str]]
    """``id``, ``type``, ``title``, ``url`` of each page."""
    cdp_token: str


# -- requests (service ``browsers``) -----------------------------------------------------


class CreateSession(Request[CreatedReply], tag="browsers.create", kw_only=True):
    actor: Principal
    body: CreateBody


class ListSessions(Request[PageReply], tag="browsers.list", kw_only=True):
    idempotent = True
    actor: Principal
    query: ListQuery = msgspec.field(default_factory=ListQuery)


class GetSession(Request[DetailReply], tag="browsers.get", kw_only=True):
    idempotent = True
    actor: Principal
    session_id: str


class DeleteSession(Request[TerminatedReply], tag="browsers.delete", kw_only=True):
    actor: Principal
    session_id: str


class GetActions(Request[ActionsReply], tag="browsers.get_actions", kw_only=True):
    idempotent = True
    actor: Principal
    session_id: str
    query: ActionsQuery = msgspec.field(default_factory=ActionsQuery)


class GetArtifacts(Request[ArtifactsReply], tag="browsers.get_artifacts", kw_only=True):
    idempotent = True
    actor: Principal
    session_id: str
    expires_s: Annotated[int, msgspec.Meta(ge=10, le=7 * 24 * 3600)] = 900


class GetConsole(Request[ConsoleReply], tag="browsers.get_console", kw_only=True):
    idempotent = True
    actor: Principal
    session_id: str


class GetNetwork(Request[NetworkReply], tag="browsers.get_network", kw_only=True):
    idempotent = True
    actor: Principal
    session_id: str


class GetHealth(Request[HealthReply], tag="browsers.get_health", kw_only=True):
    idempotent = True
    actor: Principal
    session_id: str


class GetDiscovery(Request[DiscoveryReply], tag="browsers.get_discovery", kw_only=True):
    """The ``/json/version`` and ``/json/list`` documents (auth: an actor or a CDP token)."""

    idempotent = True
    session_id: str
    actor: Principal | None = None
    token: str | None = None


class OpenCdp(Message, tag="browsers.cdp.open", kw_only=True):
    """Start of a CDP stream: the whole browser (``target_id`` None) or one page."""

    session_id: str
    actor: Principal | None = None
    token: str | None = None
    target_id: str | None = None


class CdpReady(Message, tag="browsers.cdp.ready", kw_only=True):
    client_id: int


BrowserRequest = Union[  # noqa: UP007
    CreateSession, ListSessions, GetSession, DeleteSession, GetActions, GetArtifacts, GetConsole,
    GetNetwork, GetHealth, GetDiscovery,
]


FAMILY = Family("browsers", __name__)
"""The browsers messages and their one Decoder (define every message above this line)."""
