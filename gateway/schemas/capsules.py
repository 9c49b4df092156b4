"""Bodies of ``/v1/capsules*`` and ``/v1/admin/capsules*`` (capsules reference)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from dovecote.bus.messages.capsules import (
    BackgroundExecResponse,
    Capsule,
    ExecResponse,
    FileEntry,
    ListDirResponse,
    MakeDirResponse,
    ProcessEntry,
    ProcessListResponse,
)
from dovecote.gateway.schemas.accounts import Request

Path = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class CreateCapsuleRequest(Request):
    template: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "minimal"
    vcpus: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    memory_mb: Annotated[int, msgspec.Meta(ge=1, le=1 << 22)] = 512
    disk_size_mb: Annotated[int, msgspec.Meta(ge=1, le=1 << 24)] = 5120
    timeout_sec: Annotated[int, msgspec.Meta(ge=0)] = 0
    metadata: dict[str, str] | None = None


class ExecRequest(Request):
    cmd: Annotated[str, msgspec.Meta(min_length=1, max_length=65536)]
    args: list[str] | None = None
    timeout_sec: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 30
    background: bool = False
    tag: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    envs: dict[str, str] | None = None
    cwd: Path | None = None
    user: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] | None = None


class ReadFileRequest(Request):
    path: Path


class ListDirRequest(Request):
    path: Path
    depth: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1


class MakeDirRequest(Request):
    path: Path


class RemoveRequest(Request):
    path: Path


class KillQuery(msgspec.Struct, kw_only=True):
    """Query parameters of ``DELETE .../processes/{selector}`` (documentation only)."""

    signal: Literal["SIGKILL", "SIGTERM"] = "SIGKILL"


class UploadForm(msgspec.Struct, kw_only=True):
    """``multipart/form-data`` fields of ``files/write`` (documentation only)."""

    path: str
    file: Annotated[str, msgspec.Meta(extra_json_schema={"format": "binary"})]


__all__ = [
    "BackgroundExecResponse", "Capsule", "CreateCapsuleRequest", "ExecRequest", "ExecResponse",
    "FileEntry", "KillQuery", "ListDirRequest", "ListDirResponse", "MakeDirRequest",
    "MakeDirResponse", "ProcessEntry", "ProcessListResponse", "ReadFileRequest", "RemoveRequest",
    "UploadForm",
]


class CreateSnapshotRequest(Request):
    sandbox_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    name: Annotated[str, msgspec.Meta(max_length=63)] = ""


class AdminSnapshotRequest(Request):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=63)]


class SnapshotListQuery(msgspec.Struct, kw_only=True):
    type: Literal["base", "snapshot"] | None = None


class CreateBuildRequest(Request):
    """Dovecote's body for ``POST /v1/admin/builds`` (the reference leaves it open)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
    steps: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=16384)]],
                     msgspec.Meta(min_length=1, max_length=100)]
    base_template: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "minimal"
    step_timeout_sec: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 600
