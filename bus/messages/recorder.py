"""Messages of the recorder (evidence: timelines, screenshots, artifacts, bundles) and of the
live desktop view (a capsule's VNC display as a bus stream).

Two families, each one tagged union with one decoder built once:

* :data:`RecorderRequest` (service ``recorder``). A *subject* is what evidence is
  kept about: a desktop session today, a browser session or an agent run next.
  The owning service opens it (:class:`OpenSubject`), appends timeline entries
  (:class:`RecordEntry`, a screenshot PNG riding along when the screen matters),
  stores named artifacts (:class:`PutArtifact`), says how it ended
  (:class:`MarkFailed`, :class:`CloseSubject`) and reads its summary
  (:class:`GetSummary`). The gateway exports (:class:`ExportBundle`), lists a
  bundle's download links (:class:`GetBundle`) and reclaims storage
  (:class:`Reclaim`, admins).
* :data:`LiveViewRequest` (service ``vmmgr.<host_id>``): :class:`StreamVnc` opens
  a stream that carries the raw RFB bytes of the capsule's display both ways
  (``bytes`` frames, credit flow controlled like every bus stream);
  :class:`ProbeVnc` answers whether the display answers and how fast.

Every request that comes from a user names its team (``team_id``); the recorder
refuses another team's subject with 404. Services calling on their own behalf
pass ``team_id=None``. Enumerations are ``Literal``s, refused at decode.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

from .base import Family, Message, Request
from .capsules import CapsuleOp

SubjectKind = Literal["desktop_session", "browser_session", "agent_run"]
EntryKind = Literal["action", "receipt", "state_change", "failure", "note"]
Retention = Literal["ephemeral_until_export", "temporary_postmortem_pin"]
ReviewMode = Literal["sparse_timeline", "unavailable"]
ReviewStatus = Literal["active", "idle", "exported", "unavailable"]
ReclaimMode = Literal["report", "apply"]
Tier = Literal["runtime", "cache", "exports", "legacy_build"]
ViewStatus = Literal["ready", "degraded", "stale", "unavailable"]

SubjectId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
Seconds = Annotated[int, msgspec.Meta(ge=1, le=7 * 24 * 3600)]


# -- shapes ---------------------------------------------------------------------------


class BundleRef(msgspec.Struct, kw_only=True):
    """An ArtifactRef of the desktop sessions reference: ``path`` is an ``s3://`` URI or a directory."""

    kind: str
    path: str
    mime_type: str | None = None


class ReviewSummary(msgspec.Struct, kw_only=True):
    """The reference's ReviewRecordingSummary, with true values."""

    mode: ReviewMode
    status: ReviewStatus
    retention: Retention
    event_count: int = 0
    screenshot_count: int = 0
    approx_bytes: int = 0
    last_captured_at: str | None = None
    exportable: bool = False
    exported_bundle: BundleRef | None = None
    postmortem_retained_until: str | None = None
    reason: str | None = None


class BundleFile(msgspec.Struct, kw_only=True):
    name: str
    """Relative to the bundle: ``review.json``, ``timeline.jsonl``, ``screenshots/<sha256>.png``."""
    size: int
    sha256: str
    url: str
    """A presigned URL (S3) or a short-lived signed gateway URL (filesystem)."""


class ReclaimCandidate(msgspec.Struct, kw_only=True):
    path: str
    tier: Tier
    kind: str
    reason: str
    bytes: int = 0


# -- the recorder family ----------------------------------------------------------------


class SummaryReply(Message, tag="recorder.summary", kw_only=True):
    subject_id: str
    summary: ReviewSummary


class EntryRecorded(Message, tag="recorder.entry_recorded", kw_only=True):
    seq: int
    """The entry's place in its subject's timeline (1, 2, 3... with no gap)."""
    screenshot_sha256: str | None = None
    screenshot_new: bool = False
    """False when the same screen was already stored (it cost nothing)."""


class ArtifactStored(Message, tag="recorder.artifact_stored", kw_only=True):
    artifact: BundleRef
    sha256: str
    size: int


class ExportReply(Message, tag="recorder.exported", kw_only=True):
    bundle: BundleRef
    review_recording: ReviewSummary
    uploaded: int = 0
    """Objects written by this export (screenshots already exported are not rewritten)."""


class BundleLinks(Message, tag="recorder.bundle_links", kw_only=True):
    bundle: BundleRef
    generation: int
    files: list[BundleFile]
    zip_url: str
    expires_in_s: int


class ReclaimReport(Message, tag="recorder.reclaim_report", kw_only=True):
    mode: ReclaimMode
    runtime_root: str
    cache_root: str
    exports_root: str
    legacy_build_root: str
    candidate_count: int
    candidates: list[ReclaimCandidate]
    reclaimed: list[ReclaimCandidate]
    limitations: list[str]


class OpenSubject(Request[SummaryReply], tag="recorder.open", kw_only=True):
    """Start (or find again: idempotent) the evidence of a subject."""

    idempotent = True
    subject_id: SubjectId
    kind: SubjectKind = "desktop_session"
    team_id: str
    meta: dict[str, Any] = {}
    """Copied into ``review.json`` (provider, size, profile...)."""


class RecordEntry(Request[EntryRecorded], tag="recorder.record", kw_only=True):
    """Append one entry to the subject's timeline (optionally with the screen after it)."""

    subject_id: SubjectId
    kind: EntryKind
    actor: str = "system"
    summary: dict[str, Any] = {}
    """What happened (the action, the receipt's status and id, the state change); long
    values are shortened so an entry stays small."""
    at: str | None = None
    """RFC 3339; default: when the recorder received it."""
    screenshot_png: bytes | None = None
    """The screen at this boundary; stored once per distinct content (SHA-256)."""


class PutArtifact(Request[ArtifactStored], tag="recorder.artifact", kw_only=True):
    subject_id: SubjectId
    name: Name
    kind: Name
    mime_type: str
    data: bytes


class MarkFailed(Request[SummaryReply], tag="recorder.failed", kw_only=True):
    """The subject failed: pin its evidence for post-mortem review."""

    idempotent = True
    subject_id: SubjectId
    reason: str = ""
    retain_s: Seconds | None = None
    """Default: the recorder's ``DOVECOTE_RECORDER_POSTMORTEM_HOURS`` (72 h)."""


class CloseSubject(Request[SummaryReply], tag="recorder.close", kw_only=True):
    """The subject is gone (session deleted): drop its evidence unless pinned."""

    idempotent = True
    subject_id: SubjectId


class GetSummary(Request[SummaryReply], tag="recorder.get_summary", kw_only=True):
    idempotent = True
    subject_id: SubjectId
    team_id: str | None = None


class ExportBundle(Request[ExportReply], tag="recorder.export", kw_only=True):
    subject_id: SubjectId
    team_id: str | None = None


class GetBundle(Request[BundleLinks], tag="recorder.get_bundle", kw_only=True):
    idempotent = True
    subject_id: SubjectId
    team_id: str | None = None
    expires_s: Annotated[int, msgspec.Meta(ge=10, le=7 * 24 * 3600)] = 900


class Reclaim(Request[ReclaimReport], tag="recorder.reclaim", kw_only=True):
    mode: ReclaimMode = "report"


RecorderRequest = Union[  # noqa: UP007
    OpenSubject, RecordEntry, PutArtifact, MarkFailed, CloseSubject, GetSummary, ExportBundle,
    GetBundle, Reclaim,
]
RecorderReply = Union[  # noqa: UP007
    SummaryReply, EntryRecorded, ArtifactStored, ExportReply, BundleLinks, ReclaimReport,
]
recorder_request_decoder = msgspec.msgpack.Decoder(RecorderRequest)
recorder_reply_decoder = msgspec.msgpack.Decoder(RecorderReply)


# -- the live view family (vmmgr) ---------------------------------------------------------


class VncStarted(Message, tag="liveview.started", kw_only=True):
    """The worker's first frame: the display answered; raw RFB ``bytes`` frames follow both ways."""

    width: int = 0
    height: int = 0


class VncStatus(Message, tag="liveview.status", kw_only=True):
    status: ViewStatus
    frame_age_ms: int | None = None
    """How long the display took to send a frame when asked (the probe's own)."""
    reason: str | None = None
    width: int = 0
    height: int = 0


class StreamVnc(CapsuleOp, tag="liveview.vnc", kw_only=True):
    """Relay the capsule's display: one VNC connection per stream (one viewer)."""


class ProbeVnc(CapsuleOp, Request[VncStatus], tag="liveview.probe", kw_only=True):
    """Connect to the capsule's display, ask for one pixel, and say how it went."""

    idempotent = True


LiveViewRequest = Union[StreamVnc, ProbeVnc]  # noqa: UP007
live_view_request_decoder = msgspec.msgpack.Decoder(LiveViewRequest)


FAMILY = Family("recorder", __name__)
"""The recorder messages and their one Decoder (define every message above this line)."""
