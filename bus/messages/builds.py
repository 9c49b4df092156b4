"""Template builds (``/v1/admin/builds*``): boot a capsule, run shell steps, snapshot it.

A build runs on the vmmgr that accepted :class:`SubmitBuild` (bus name
``vmmgr``); the others are answered by any vmmgr (records are shared) and
:class:`CancelBuild` is forwarded to the build's host.
"""

from __future__ import annotations

import msgspec

from .base import Family, Message
from .common import Principal

BUILD_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class BuildStep(msgspec.Struct, kw_only=True):
    """One shell step and, once it ran, its log."""

    index: int
    cmd: str
    status: str = "pending"
    """``pending``, ``running``, ``succeeded``, ``failed`` or ``cancelled``."""
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    started_at: str | None = None
    duration_ms: int | None = None


class Build(msgspec.Struct, kw_only=True):
    id: str
    name: str
    base_template: str
    status: str
    steps: list[BuildStep]
    template: str | None = None
    """The platform template made on success."""
    error: str | None = None
    sandbox_id: str | None = None
    host_id: str = ""
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    duration_ms: int | None = None


class SubmitBuild(Message, tag="builds.submit", kw_only=True):
    actor: Principal
    name: str
    base_template: str = "minimal"
    steps: list[str]
    step_timeout_sec: int = 600


class BuildReply(Message, tag="builds.build", kw_only=True):
    build: Build


class ListBuilds(Message, tag="builds.list", kw_only=True):
    actor: Principal


class BuildList(Message, tag="builds.listed", kw_only=True):
    builds: list[Build]


class GetBuild(Message, tag="builds.get", kw_only=True):
    actor: Principal
    build_id: str


class CancelBuild(Message, tag="builds.cancel", kw_only=True):
    actor: Principal
    build_id: str


FAMILY = Family("builds", __name__)
"""The builds messages and their one Decoder (define every message above this line)."""
