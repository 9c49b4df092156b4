"""Placement rules: what a new capsule may ask for, and what a team may run at once.

The bus load-balances :class:`~dovecote.bus.messages.capsules.CreateCapsule`
over every vmmgr registered as ``vmmgr``; the host that receives it runs the
capsule, after the checks here. They are plain functions over numbers (no
I/O), so the limits are tested without a database or a VM:

* :func:`normalize_spec` validates one request against the per-capsule limits
  (400 ``invalid_request``, 404 ``template_not_found``) and applies the
  reference's defaults and clamps (``timeout_sec`` below 60 becomes 60,
  ``disk_size_mb`` is capped);
* :func:`check_team_caps` refuses a capsule that would take a team past its
  running capsules, vCPUs or memory (429 ``quota_capsules``,
  ``quota_vcpus``, ``quota_memory``);
* :func:`check_host_capacity` refuses one this host has no room for (503
  ``host_full``).

Usage counts every capsule that holds (or is about to hold) a VM: see
:data:`LIVE_STATUSES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dovecote.bus.messages.capsules import CapsuleSpec
from dovecote.libs.errors import ServiceError

LIVE_STATUSES = ("pending", "starting", "running", "pausing", "resuming", "stopping")
"""Statuses in which a capsule counts against its team's caps and its host."""

MIN_TIMEOUT_SEC = 60
"""Positive auto-pause TTLs below this are clamped to it (the reference's rule)."""

MAX_METADATA_ENTRIES = 50


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per-capsule and per-team limits (from ``VmmgrConfig``)."""

    templates: tuple[str, ...] = ("minimal",)
    max_vcpus: int = 8
    min_memory_mb: int = 128
    max_memory_mb: int = 16384
    max_disk_size_mb: int = 5120
    max_timeout_sec: int = 7 * 24 * 3600
    team_max_capsules: int = 10
    team_max_vcpus: int = 16
    team_max_memory_mb: int = 32768


@dataclass(frozen=True, kw_only=True)
class Usage:
    """What a team (or a host) runs now."""

    capsules: int = 0
    vcpus: int = 0
    memory_mb: int = 0


def normalize_spec(spec: CapsuleSpec, limits: Limits, *, known_template: bool = False) -> CapsuleSpec:
    """The spec with defaults and clamps applied, or a 400/404 ServiceError.

    ``known_template``: the caller resolved the template already (a snapshot).
    """
    if not known_template and spec.template not in limits.templates:
        raise ServiceError(404, "template_not_found", f"template {spec.template!r} not found")
    if not 1 <= spec.vcpus <= limits.max_vcpus:
        raise ServiceError(400, "invalid_request", f"vcpus must be between 1 and {limits.max_vcpus}")
    if not limits.min_memory_mb <= spec.memory_mb <= limits.max_memory_mb:
        raise ServiceError(400, "invalid_request",
                           f"memory_mb must be between {limits.min_memory_mb} and {limits.max_memory_mb}")
    if spec.disk_size_mb < 1:
        raise ServiceError(400, "invalid_request", "disk_size_mb must be positive")
    if not 0 <= spec.timeout_sec <= limits.max_timeout_sec:
        raise ServiceError(400, "invalid_request",
                           f"timeout_sec must be between 0 and {limits.max_timeout_sec}")
    metadata = spec.metadata or {}
    if len(metadata) > MAX_METADATA_ENTRIES or any(
            len(k) > 128 or len(v) > 1024 for k, v in metadata.items()):
        raise ServiceError(400, "invalid_request",
                           f"metadata takes at most {MAX_METADATA_ENTRIES} entries "
                           "(keys up to 128, values up to 1024 characters)")
    timeout = spec.timeout_sec
    if 0 < timeout < MIN_TIMEOUT_SEC:
        timeout = MIN_TIMEOUT_SEC
    return CapsuleSpec(template=spec.template, vcpus=spec.vcpus, memory_mb=spec.memory_mb,
                       disk_size_mb=min(spec.disk_size_mb, limits.max_disk_size_mb),
                       timeout_sec=timeout, metadata=dict(metadata))


def check_team_caps(usage: Usage, spec: CapsuleSpec, limits: Limits) -> None:
    """429 unless the team can run ``spec`` on top of ``usage``."""
    if usage.capsules + 1 > limits.team_max_capsules:
        raise ServiceError(429, "quota_capsules",
                           f"the team already runs {usage.capsules} capsules "
                           f"(limit {limits.team_max_capsules}); destroy one first")
    if usage.vcpus + spec.vcpus > limits.team_max_vcpus:
        raise ServiceError(429, "quota_vcpus",
                           f"the team's running capsules use {usage.vcpus} of "
                           f"{limits.team_max_vcpus} vCPUs; {spec.vcpus} more do not fit")
    if usage.memory_mb + spec.memory_mb > limits.team_max_memory_mb:
        raise ServiceError(429, "quota_memory",
                           f"the team's running capsules use {usage.memory_mb} of "
                           f"{limits.team_max_memory_mb} MB of memory; {spec.memory_mb} MB more "
                           "do not fit")


def check_host_capacity(usage: Usage, spec: CapsuleSpec, *, max_capsules: int,
                        max_memory_mb: int) -> None:
    """503 unless this host has room for ``spec`` (0 means no limit)."""
    if max_capsules and usage.capsules + 1 > max_capsules:
        raise ServiceError(503, "host_full", "this host runs as many capsules as it may")
    if max_memory_mb and usage.memory_mb + spec.memory_mb > max_memory_mb:
        raise ServiceError(503, "host_full", "this host has no memory left for the capsule")


# -- choosing a host ---------------------------------------------------------------

HOST_TAGS_KEY = "host_tags"
"""Capsule metadata key naming the host tags a capsule needs (comma-separated)."""


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """An online host a capsule may go to, with what it runs now."""

    id: str
    type: str
    team_id: str = ""
    tags: frozenset[str] = frozenset()
    memory_mb: int | None = None
    """The host's memory (from its registration), or None if unknown."""
    usage: Usage = Usage()


def wanted_tags(metadata: dict[str, str] | None) -> frozenset[str]:
    """The host tags a capsule asks for in its metadata (``host_tags: "gpu,ssd"``)."""
    raw = (metadata or {}).get(HOST_TAGS_KEY, "")
    return frozenset(tag.strip() for tag in raw.split(",") if tag.strip())


def choose_host(candidates: list[Candidate], *, team_id: str, spec: CapsuleSpec,
                local_host_id: str) -> str:
    """The host for a new capsule of ``team_id``.

    Rules: only hosts carrying every wanted tag; the team's own BYOC hosts if
    any qualifies, else the platform's regular hosts (a BYOC host never runs
    another team's capsule); only hosts whose registered memory has room; then
    the least loaded (share of memory in use, or capsule count when the
    memory is unknown), this host first on ties.

    Raises:
        ServiceError: 409 ``no_matching_host`` when no online host has the
            tags; 400 ``invalid_request`` when the capsule is larger than every
            eligible host; 503 ``no_host_available`` when none has room now.
    """
    tags = wanted_tags(spec.metadata)
    eligible = [c for c in candidates if tags <= c.tags
                and (c.type == "regular" or (c.type == "byoc" and c.team_id == team_id))]
    if not eligible:
        wanted = ", ".join(sorted(tags)) or "none"
        raise ServiceError(409, "no_matching_host",
                           f"no online host may run this capsule (tags wanted: {wanted})")
    own = [c for c in eligible if c.type == "byoc"]
    pool = own or eligible
    if all(c.memory_mb is not None for c in pool):
        largest = max(c.memory_mb or 0 for c in pool)
        if spec.memory_mb > largest:  # no host could ever run it: not "retry later"
            raise ServiceError(400, "invalid_request",
                               f"memory_mb {spec.memory_mb} is more than any eligible host has "
                               f"(the largest has {largest} MB)")
    room = [c for c in pool if c.memory_mb is None or c.usage.memory_mb + spec.memory_mb <= c.memory_mb]
    if not room:
        raise ServiceError(503, "no_host_available", "every eligible host is full; retry later",
                           retry_after=30)

    def load(c: Candidate) -> tuple[float, bool, str]:
        share = c.usage.memory_mb / c.memory_mb if c.memory_mb else float(c.usage.capsules)
        return (share, c.id != local_host_id, c.id)

    return min(room, key=load).id
