"""Messages of the desktops service (``/api/sessions*``, ``/api/tasks*``, ``/api/dashboard``...).

The wire shapes of the desktop sessions reference (field names, enums,
receipts) are the Structs here, shared by the gateway (which decodes the HTTP
bodies into them) and the service (which fills them). Two families:

* :data:`Action`: one request body of ``POST /api/sessions/{id}/actions``, a
  union tagged by ``kind`` (decoded once by :data:`action_decoder`). Every kind
  also takes ``task_id`` (or ``taskId``). Coordinates are checked against the
  session's size by the service (``services/desktops/actions.py``).
* :data:`DesktopRequest`: the bus requests the ``desktops`` service answers,
  each declaring its reply (decoded by :data:`request_decoder` on the service's
  side, by the reply decoder of each request on the caller's).

Refusals are raised as :class:`~dovecote.libs.errors.ServiceError`; the ones
whose HTTP body is not the platform's ``{"error": {"code", "message"}}`` (an
unknown session is ``{"error": "session not found"}``, an unready bridge is
``{"error": StructuredError}``) carry the exact body in ``details["wire"]``,
which the gateway sends as is.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec

from .base import Family, Message, Request
from .common import Principal

PROVIDERS = ("qemu", "xvfb")
READINESS_STATES = ("booting", "desktop_ready", "bridge_listening", "bridge_attached",
                    "runtime_ready", "failed")
BRIDGE_STATUSES = ("viewer_only", "bridge_waiting", "runtime_ready", "failed")
TASK_STATUSES = ("pending", "running", "paused", "terminated", "completed")
TASK_VERBS = ("pause", "resume", "terminate", "complete", "reset")

ReadinessState = Literal["booting", "desktop_ready", "bridge_listening", "bridge_attached",
                         "runtime_ready", "failed"]
BridgeStatus = Literal["viewer_only", "bridge_waiting", "runtime_ready", "failed"]
SessionState = Literal["starting", "running", "failed", "stopped"]
TaskStatus = Literal["pending", "running", "paused", "terminated", "completed"]
TaskVerb = Literal["pause", "resume", "terminate", "complete", "reset"]
QemuProfile = Literal["product", "regression"]
MouseButton = Literal["left", "middle", "right"]

# -- shapes of the reference ------------------------------------------------------


class ArtifactRef(msgspec.Struct, kw_only=True):
    kind: str
    path: str
    mime_type: str | None = None


class StructuredError(msgspec.Struct, kw_only=True):
    """``code`` is one of ``missing_tool`` (category ``environment``), ``command_failed``
    (``execution``, retryable), ``unsupported``, ``io_error`` (``io``),
    ``provider_bridge_unavailable`` (``provider``), ``invalid_action`` (``validation``)."""

    code: str
    message: str
    retryable: bool = False
    category: str = ""
    details: dict[str, Any] = {}
    artifact_refs: list[ArtifactRef] = []


class LiveDesktopView(msgspec.Struct, kw_only=True):
    mode: Literal["stream", "screenshot_poll", "unavailable"]
    status: Literal["ready", "degraded", "stale", "unavailable"]
    provider_surface: Literal["qemu_novnc", "guest_xvfb_screenshot", "none"]
    matches_action_plane: bool
    canonical_url: str | None = None
    debug_url: str | None = None
    reason: str | None = None
    refresh_interval_ms: int | None = None


class ReviewRecordingSummary(msgspec.Struct, kw_only=True):
    mode: Literal["sparse_timeline", "unavailable"]
    status: Literal["active", "idle", "exported", "unavailable"]
    retention: Literal["ephemeral_until_export", "temporary_postmortem_pin"]
    event_count: int = 0
    screenshot_count: int = 0
    approx_bytes: int = 0
    last_captured_at: str | None = None
    exportable: bool = False
    exported_bundle: ArtifactRef | None = None
    postmortem_retained_until: str | None = None
    reason: str | None = None


class SessionRecord(msgspec.Struct, kw_only=True):
    id: str
    provider: str
    qemu_profile: str | None
    display: str | None
    width: int
    height: int
    state: SessionState
    created_at: str
    artifacts_dir: str | None
    capabilities: list[str]
    browser_command: str | None
    desktop_user: str | None
    desktop_home: str | None
    desktop_runtime_dir: str | None
    runtime_base_url: str | None
    viewer_url: str | None
    live_desktop_view: LiveDesktopView
    review_recording: ReviewRecordingSummary
    bridge_status: BridgeStatus
    readiness_state: ReadinessState
    bridge_error: str | None
    readiness_history: list[dict[str, str]] = []
    """Each rung reached, ``{"state", "at"}`` (a Dovecote addition)."""


class CreateSessionBody(msgspec.Struct, kw_only=True):
    """``POST /api/sessions``. ``provider`` is checked by the service (400 ``unsupported_provider``)."""

    provider: str = "qemu"
    width: int = 1440
    height: int = 900
    display: str | None = None
    browser_command: str | None = None
    boot: str | None = None
    """Debug override: ``no-bridge`` starts the desktop without its bridge (it ends ``failed``)."""
    container_image: str | None = None
    disable_kvm: bool | None = None
    qemu_profile: QemuProfile = "product"
    shared_host_path: str | None = None
    desktop_user: str | None = None
    desktop_home: str | None = None
    desktop_runtime_dir: str | None = None


class ActionReceipt(msgspec.Struct, kw_only=True):
    status: Literal["ok", "error"]
    receipt_id: str
    action_type: str
    started_at: str
    completed_at: str
    result: dict[str, Any] = {}
    artifacts: list[ArtifactRef] = []
    error: StructuredError | None = None


class HistoryEntry(msgspec.Struct, kw_only=True):
    action: dict[str, Any]
    receipt: ActionReceipt
    source: str = "api"


class ScreenshotInfo(msgspec.Struct, kw_only=True):
    mime_type: str
    data_base64: str
    width: int
    height: int
    artifact_path: str | None = None


class ActiveWindow(msgspec.Struct, kw_only=True):
    id: str
    title: str
    class_name: str


class CursorPosition(msgspec.Struct, kw_only=True):
    x: int
    y: int
    screen: int = 0


class Observation(msgspec.Struct, kw_only=True):
    captured_at: str
    screenshot: ScreenshotInfo
    active_window: ActiveWindow | None
    cursor_position: CursorPosition | None
    capability_flags: list[str]
    browser: dict[str, Any] | None
    raw: dict[str, Any]
    summary: str
    screenshot_url: str
    action_history: list[HistoryEntry]


class ActionCapability(msgspec.Struct, kw_only=True):
    name: str
    description: str
    category: str
    requires_approval: bool = False


class Capabilities(msgspec.Struct, kw_only=True):
    actions: list[ActionCapability]
    provider: str
    browser_mode: str
    vm_mode: str
    enrichments: list[str] = []
    isolation: str = ""
    """How strongly the session is kept from the host (a Dovecote addition)."""


class Task(msgspec.Struct, kw_only=True):
    id: str
    sessionId: str
    description: str
    status: TaskStatus
    createdAt: str
    updatedAt: str
    thoughtSummary: str | None = None
    requireApproval: bool = False
    lastReceipt: ActionReceipt | None = None


class CreateTaskBody(msgspec.Struct, kw_only=True):
    session_id: str
    description: str
    thought_summary: str | None = None
    require_approval: bool = False


class GuestHealth(msgspec.Struct, kw_only=True):
    status: str
    session_count: int
    runtime_base_url: str | None = None


class ProviderHealth(msgspec.Struct, kw_only=True):
    enabled: bool
    status: str
    isolation: str
    reason: str | None = None


class DesktopHealth(msgspec.Struct, kw_only=True):
    ok: bool
    guest: GuestHealth
    now: str
    providers: dict[str, ProviderHealth] = {}


# -- actions (POST /api/sessions/{id}/actions) -----------------------------------------


class ActionBase(msgspec.Struct, tag_field="kind", kw_only=True):
    task_id: str | None = None
    taskId: str | None = None

    def task(self) -> str | None:
        """The task the action belongs to, whichever spelling carried it."""
        return self.task_id or self.taskId


class Bounds(msgspec.Struct, kw_only=True):
    x: int
    y: int
    width: int
    height: int


class MouseMove(ActionBase, tag="mouse_move", kw_only=True):
    x: int
    y: int


class MouseClick(ActionBase, tag="mouse_click", kw_only=True):
    button: MouseButton = "left"
    x: int | None = None
    y: int | None = None


class MouseDrag(ActionBase, tag="mouse_drag", kw_only=True):
    start_x: int
    start_y: int
    end_x: int
    end_y: int


class Scroll(ActionBase, tag="scroll", kw_only=True):
    delta_x: int
    delta_y: int


class KeyPress(ActionBase, tag="key_press", kw_only=True):
    key: str


class TypeText(ActionBase, tag="type_text", kw_only=True):
    text: str


class Hotkey(ActionBase, tag="hotkey", kw_only=True):
    keys: list[str]


class OpenApp(ActionBase, tag="open_app", kw_only=True):
    name: str
    run_as_user: str | None = None


class FocusWindow(ActionBase, tag="focus_window", kw_only=True):
    window_id: str | int


class ResizeWindow(ActionBase, tag="resize_window", kw_only=True):
    window_id: str | int
    bounds: Bounds


class RunCommand(ActionBase, tag="run_command", kw_only=True):
    command: str
    cwd: str | None = None
    env: dict[str, str] | None = None
    run_as_user: str | None = None


class ReadFileAction(ActionBase, tag="read_file", kw_only=True):
    path: str


class WriteFileAction(ActionBase, tag="write_file", kw_only=True):
    path: str
    contents: str


class BrowserOpen(ActionBase, tag="browser_open", kw_only=True):
    url: str


class BrowserGetDom(ActionBase, tag="browser_get_dom", kw_only=True):
    pass


class BrowserClick(ActionBase, tag="browser_click", kw_only=True):
    selector: str | None = None
    x: int | None = None
    y: int | None = None
    button: MouseButton = "left"


class BrowserType(ActionBase, tag="browser_type", kw_only=True):
    selector: str | None = None
    text: str | None = None


class BrowserScreenshot(ActionBase, tag="browser_screenshot", kw_only=True):
    pass


Action = Union[  # noqa: UP007 - msgspec needs a runtime union of the tagged Structs
    MouseMove, MouseClick, MouseDrag, Scroll, KeyPress, TypeText, Hotkey, OpenApp, FocusWindow,
    ResizeWindow, RunCommand, ReadFileAction, WriteFileAction, BrowserOpen, BrowserGetDom,
    BrowserClick, BrowserType, BrowserScreenshot]
"""Every action kind of the reference, tagged by ``kind``."""

ACTION_TYPES: tuple[type[ActionBase], ...] = Action.__args__  # type: ignore[attr-defined]
ACTION_KINDS: tuple[str, ...] = tuple(str(t.__struct_config__.tag) for t in ACTION_TYPES)

action_decoder = msgspec.json.Decoder(Action)
"""Decodes one JSON action body (unknown fields are ignored, missing or mistyped ones refused)."""


def action_dict(action: ActionBase) -> dict[str, Any]:
    """The action as the JSON object a client sent (``kind`` included, unset options left out)."""
    raw = msgspec.to_builtins(action)
    return {k: v for k, v in raw.items() if v is not None}


# -- bus requests (to "desktops") ---------------------------------------------------------


class SessionReply(Message, tag="desktops.session", kw_only=True):
    session: SessionRecord
    browser_adapter: bool = False


class SessionList(Message, tag="desktops.sessions", kw_only=True):
    sessions: list[SessionRecord]


class DesktopDone(Message, tag="desktops.done", kw_only=True):
    ok: bool = True


class ReceiptReply(Message, tag="desktops.receipt", kw_only=True):
    receipt: ActionReceipt


class ObservationReply(Message, tag="desktops.observation", kw_only=True):
    observation: Observation


class ScreenshotReply(Message, tag="desktops.screenshot", kw_only=True):
    png: bytes


class CapabilitiesReply(Message, tag="desktops.capabilities", kw_only=True):
    capabilities: Capabilities


class TaskReply(Message, tag="desktops.task", kw_only=True):
    task: Task


class DashboardReply(Message, tag="desktops.dashboard", kw_only=True):
    tasks: list[Task]
    action_history: dict[str, list[HistoryEntry]]


class HealthReply(Message, tag="desktops.health", kw_only=True):
    health: DesktopHealth


class CreateSession(Request[SessionReply], tag="desktops.create", kw_only=True):
    """Create a session for the caller's team (qemu: a capsule of the desktop template)."""

    actor: Principal
    body: CreateSessionBody


class ListSessions(Request[SessionList], tag="desktops.list", kw_only=True):
    actor: Principal


class GetSession(Request[SessionReply], tag="desktops.get", kw_only=True):
    actor: Principal
    session_id: str


class DeleteSession(Request[DesktopDone], tag="desktops.delete", kw_only=True):
    """Stop the VM or the sandbox and delete the session's runtime storage."""

    actor: Principal
    session_id: str


class RunAction(Request[ReceiptReply], tag="desktops.action", kw_only=True):
    """Run one action; the reply is its receipt (``status: error`` when the action failed)."""

    actor: Principal
    session_id: str
    action: Action


class GetObservation(Request[ObservationReply], tag="desktops.observe", kw_only=True):
    actor: Principal
    session_id: str


class GetScreenshot(Request[ScreenshotReply], tag="desktops.screenshot_get", kw_only=True):
    actor: Principal
    session_id: str


class GetCapabilities(Request[CapabilitiesReply], tag="desktops.capabilities_get", kw_only=True):
    """One session's capabilities, or the service's with an empty ``session_id``."""

    actor: Principal
    session_id: str = ""


class CreateTask(Request[TaskReply], tag="desktops.task_create", kw_only=True):
    actor: Principal
    body: CreateTaskBody


class GetTask(Request[TaskReply], tag="desktops.task_get", kw_only=True):
    actor: Principal
    task_id: str


class ChangeTask(Request[TaskReply], tag="desktops.task_change", kw_only=True):
    actor: Principal
    task_id: str
    verb: TaskVerb


class GetDashboard(Request[DashboardReply], tag="desktops.dashboard_get", kw_only=True):
    actor: Principal


class GetHealth(Request[HealthReply], tag="desktops.health_get", kw_only=True):
    actor: Principal


DesktopRequest = Union[  # noqa: UP007
    CreateSession, ListSessions, GetSession, DeleteSession, RunAction, GetObservation,
    GetScreenshot, GetCapabilities, CreateTask, GetTask, ChangeTask, GetDashboard, GetHealth]
"""Every request the desktops service answers."""

request_decoder = msgspec.msgpack.Decoder(DesktopRequest)


FAMILY = Family("desktops", __name__)
"""The desktops messages and their one Decoder (define every message above this line)."""
