"""Messages of the vmmgr service for capsules (``/v1/capsules*``, ``/v1/admin/capsules*``).

Routing (see ``vmmgr/service.py``): every vmmgr registers as ``vmmgr`` and as
``vmmgr.<host_id>``.

* ``vmmgr`` (any host) answers :class:`CreateCapsule` (placement: the host that
  receives it runs the capsule), :class:`ListCapsules` and
  :class:`LookupCapsule` (capsule records live in the one ``vmmgr`` schema, so
  any host can read them);
* ``vmmgr.<host_id>`` answers the operations on one capsule, which all derive
  from :class:`CapsuleOp`: :class:`DestroyCapsule`, :class:`ExecCommand`,
  :class:`ListProcesses`, :class:`KillProcess`, :class:`PingCapsule` and the
  file operations. The gateway resolves the host with :class:`LookupCapsule`
  first.

Every request carries the caller (:class:`Principal`); a capsule of another
team is "not found" unless ``admin`` is set by an admin route *and* the
caller is a platform admin (vmmgr checks both). Refusals are a
:class:`~dovecote.bus.messages.common.Failure` (404 ``not_found``, 409
``not_running``, 429 ``quota_*``, 503 ``image_not_ready``...).

Every status change of a capsule is published as :class:`CapsuleStateChanged`
on the event topic :data:`CAPSULE_STATE_TOPIC`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .base import Family, Message, Request
from .common import Principal

CAPSULE_STATE_TOPIC = "capsule.state.changed"

# Enumerated fields are Literals (and ranges are Meta constraints): a bad value
# is refused once, when the message (or the HTTP input built from it) is decoded.
Signal = Literal["SIGKILL", "SIGTERM"]
"""The signals a caller may send to a capsule's process or PTY."""
TemplateKind = Literal["", "base", "snapshot"]
"""A template listing's filter: every kind (``""``), base images or snapshots."""
Depth = Annotated[int, msgspec.Meta(ge=0, le=10)]
"""How deep a directory listing goes."""

STATUSES = ("pending", "starting", "running", "pausing", "paused", "resuming", "stopping",
            "hibernated", "stopped", "missing", "error")
"""Every status of the reference's ``Capsule`` schema."""

# -- response bodies (the reference's schemas) ---------------------------------


class Capsule(msgspec.Struct, kw_only=True):
    """The reference's ``Capsule``."""

    id: str
    status: str
    template: str
    vcpus: int
    memory_mb: int
    timeout_sec: int
    guest_ip: str = ""
    host_ip: str = ""
    created_at: str = ""
    started_at: str | None = None
    last_active_at: str | None = None
    last_updated: str = ""
    metadata: dict[str, str] | None = None
    disk_size_mb: int | None = None
    """Once running, the size of the capsule's root filesystem as ``df`` counts it."""
    disk_used_mb: int | None = None
    """What the root filesystem holds (``df``'s Used), refreshed every few seconds; null until known."""
    host_unreachable_since: str | None = None
    """Set while the capsule's host is silent: operations answer 503 ``host_unavailable``
    until it returns (the status is what it was when the host went quiet)."""


class ExecResponse(msgspec.Struct, kw_only=True):
    sandbox_id: str
    cmd: str
    stdout: str
    stderr: str
    exit_code: int
    duration_ms: int
    encoding: str = "utf-8"


class BackgroundExecResponse(msgspec.Struct, kw_only=True):
    sandbox_id: str
    cmd: str
    pid: int
    tag: str


class ProcessEntry(msgspec.Struct, kw_only=True):
    pid: int
    tag: str | None = None
    cmd: str = ""
    args: list[str] = []


class ProcessListResponse(msgspec.Struct, kw_only=True):
    processes: list[ProcessEntry]


class FileEntry(msgspec.Struct, kw_only=True):
    name: str
    path: str
    type: str
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    modified_at: int
    symlink_target: str | None = None


class ListDirResponse(msgspec.Struct, kw_only=True):
    entries: list[FileEntry]


class MakeDirResponse(msgspec.Struct, kw_only=True):
    entry: FileEntry


class CapsuleSpec(msgspec.Struct, kw_only=True):
    """What a new capsule asks for (the reference's ``CreateCapsuleRequest``)."""

    template: str = "minimal"
    vcpus: int = 1
    memory_mb: int = 512
    disk_size_mb: int = 5120
    timeout_sec: int = 0
    metadata: dict[str, str] | None = None


# -- placement and records (to "vmmgr") ----------------------------------------


class CreateCapsule(Request["CapsuleReply"], tag="capsules.create", kw_only=True):
    """Create a capsule for the caller's team on the receiving host (reply :class:`CapsuleReply`)."""

    actor: Principal
    spec: CapsuleSpec
    placed: bool = False
    """Set when forwarded by the vmmgr that chose this host: create here, do not place again."""


class ListCapsules(Request["CapsuleList"], tag="capsules.list", kw_only=True):
    """The caller's team's capsules, or every team's with ``all_teams`` (admins)."""

    idempotent = True

    actor: Principal
    all_teams: bool = False


class LookupCapsule(Request["CapsuleReply"], tag="capsules.lookup", kw_only=True):
    """Where a capsule runs (reply :class:`CapsuleReply`: its ``host_id`` names the host).

    With ``operation`` the caller is about to send an operation to that host:
    a silent host is refused at once (503 ``host_unavailable``) instead of
    letting the operation wait for an answer that cannot come.
    """

    idempotent = True

    actor: Principal
    capsule_id: str
    admin: bool = False
    operation: bool = False


class CapsuleReply(Message, tag="capsules.capsule", kw_only=True):
    capsule: Capsule
    host_id: str
    team_id: str


class CapsuleList(Message, tag="capsules.listed", kw_only=True):
    capsules: list[Capsule]


# -- operations on one capsule (to "vmmgr.<host_id>") ---------------------------


class CapsuleOp(Message, kw_only=True):
    """Base of the operations on one capsule (abstract: its tag has no dot)."""

    actor: Principal
    capsule_id: str
    admin: bool = False
    found: CapsuleReply | None = None
    """The capsule as ``vmmgr``'s :class:`LookupCapsule` (``operation``) just found it for
    this ``actor`` and ``admin``: the host's agent operations take it instead of reading
    the row again (without it, or for another capsule, the host reads the row itself)."""


class DestroyCapsule(CapsuleOp, Request["CapsuleReply"], tag="capsules.destroy", kw_only=True):
    """Stop the VM and drop its disk; the reply is the capsule, ``stopping`` or later."""


class ExecCommand(CapsuleOp, Request["ExecReply"], tag="capsules.exec", kw_only=True):
    cmd: str
    args: list[str] | None = None
    timeout_sec: int = 30
    background: bool = False
    tag: str | None = None
    envs: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    """Run as this user of the guest (default: the image's, ``wrenn-user``)."""


class ExecReply(Message, tag="capsules.exec_reply", kw_only=True):
    """Exactly one of ``result`` (foreground) and ``started`` (background)."""

    result: ExecResponse | None = None
    started: BackgroundExecResponse | None = None


class ListProcesses(CapsuleOp, Request["ProcessesReply"], tag="capsules.processes", kw_only=True):
    pass


class ProcessesReply(Message, tag="capsules.processes_reply", kw_only=True):
    body: ProcessListResponse


class KillProcess(CapsuleOp, Request["CapsuleDone"], tag="capsules.kill", kw_only=True):
    selector: str
    signal: Signal = "SIGKILL"


class PingCapsule(CapsuleOp, Request["CapsuleDone"], tag="capsules.ping", kw_only=True):
    """Reset the capsule's inactivity timer (``last_active_at``)."""


class CaptureScreen(CapsuleOp, tag="capsules.screenshot", kw_only=True):
    """The capsule's display now, taken by the host from the VM (libvirt's screenshot:
    no guest agent involved, so it works before the guest's bridge is up)."""


class ScreenImage(Message, tag="capsules.screenshot_image", kw_only=True):
    png: bytes
    width: int
    height: int


class ShareDirectory(CapsuleOp, Request["CapsuleDone"], tag="capsules.share_directory", kw_only=True):
    """Show the host directory ``host_path`` in a running ``desktop`` capsule's 9p share, as
    ``hostshare`` (the guest mounts the share at ``/shared``). Sent by the desktops service
    for a session's ``shared_host_path``, which it checked against the operator's root;
    vmmgr lets QEMU's user read and write it (a POSIX ACL on that directory)."""

    host_path: str


class EnsureDesktopTemplate(Message, tag="capsules.desktop_template", kw_only=True):
    """Start building this host's desktop template (``desktop``) unless it is ready or
    being built; answers its status at once. To ``vmmgr`` (any host) or ``vmmgr.<host>``."""

    actor: Principal
    build: bool = True
    """False: only the status (a health check starts no build)."""


class EnsureBrowserTemplate(Message, tag="capsules.browser_template", kw_only=True):
    """As :class:`EnsureDesktopTemplate`, for this host's browser template (``browser``:
    the desktop image with headless Chromium running, frozen); the reply is a
    :class:`DesktopTemplateStatus`."""

    actor: Principal
    build: bool = True


DesktopTemplateState = Literal["ready", "building", "failed", "unavailable"]


class DesktopTemplateStatus(Message, tag="capsules.desktop_template_status", kw_only=True):
    status: DesktopTemplateState
    detail: str = ""
    """The build step while ``building``, the reason when ``failed`` or ``unavailable``."""
    host_id: str = ""
    vcpus: int = 0
    memory_mb: int = 0


class WriteFile(CapsuleOp, Request["CapsuleDone"], tag="capsules.files.write", kw_only=True):
    path: str
    data: bytes


class ReadFile(CapsuleOp, Request["FileContent"], tag="capsules.files.read", kw_only=True):
    path: str


class FileContent(Message, tag="capsules.files.content", kw_only=True):
    data: bytes


class ListDir(CapsuleOp, Request["ListDirReply"], tag="capsules.files.list", kw_only=True):
    path: str
    depth: Depth = 1


class ListDirReply(Message, tag="capsules.files.listed", kw_only=True):
    body: ListDirResponse


class MakeDir(CapsuleOp, Request["MakeDirReply"], tag="capsules.files.mkdir", kw_only=True):
    path: str


class MakeDirReply(Message, tag="capsules.files.made", kw_only=True):
    body: MakeDirResponse


class RemovePath(CapsuleOp, Request["CapsuleDone"], tag="capsules.files.remove", kw_only=True):
    path: str


class CapsuleDone(Message, tag="capsules.done", kw_only=True):
    """Success without a body (the gateway answers 204)."""


class PauseCapsule(CapsuleOp, Request["CapsuleReply"], tag="capsules.pause", kw_only=True):
    """Save the VM's memory and device state and free it (reply :class:`CapsuleReply`, ``pausing``)."""


class ResumeCapsule(CapsuleOp, Request["CapsuleReply"], tag="capsules.resume", kw_only=True):
    """Restore a paused capsule on its host (reply :class:`CapsuleReply`, ``resuming``)."""


# -- templates (snapshots) -------------------------------------------------------


class Template(msgspec.Struct, kw_only=True):
    """The reference's ``Template``."""

    name: str
    type: str
    vcpus: int | None = None
    memory_mb: int | None = None
    size_bytes: int = 0
    created_at: str = ""
    platform: bool = False
    metadata: dict[str, str] | None = None


class CreateSnapshot(CapsuleOp, Request["TemplateReply"], tag="capsules.snapshot", kw_only=True):
    """Live-snapshot a running capsule into a new template named ``name`` (generated if empty).

    Sent to the capsule's host; the reply is :class:`TemplateReply`.
    """

    name: str = ""


class TemplateReply(Message, tag="capsules.template", kw_only=True):
    template: Template


class ListTemplates(Request["TemplateList"], tag="capsules.templates", kw_only=True):
    """The templates the caller's team may use (its own and the platform's); ``type`` filters."""

    actor: Principal
    kind: TemplateKind = ""
    all_teams: bool = False


class TemplateList(Message, tag="capsules.templates_listed", kw_only=True):
    templates: list[Template]


class DeleteTemplate(Request["CapsuleDone"], tag="capsules.template_delete", kw_only=True):
    """Delete one of the team's snapshot templates (any host; forwarded to the one holding it)."""

    actor: Principal
    name: str
    admin: bool = False


# -- events --------------------------------------------------------------------


class CapsuleStateChanged(Message, tag="capsules.state_changed", kw_only=True):
    """A capsule changed status (topic :data:`CAPSULE_STATE_TOPIC`)."""

    capsule_id: str
    team_id: str
    host_id: str
    old_status: str | None
    new_status: str
    error: str | None = None
    at: str = ""


FAMILY = Family("capsules", __name__)
"""The capsules messages and their one Decoder (define every message above this line)."""
