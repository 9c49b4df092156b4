"""Bodies of ``/v1/hosts*`` (capsules reference, tag hosts)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from dovecote.bus.messages.hosts import (
    CreateHostResponse,
    Host,
    HostDeletePreview,
    RefreshHostTokenResponse,
    RegisterHostResponse,
)
from dovecote.gateway.schemas.accounts import Request

Label = Annotated[str, msgspec.Meta(max_length=64)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class CreateHostRequest(Request):
    """``type`` regular (shared, admins only) or byoc (``team_id`` required)."""

    type: Literal["regular", "byoc"]
    team_id: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    provider: Label | None = None
    availability_zone: Label | None = None


class RegisterHostRequest(Request):
    """Sent by the host agent with the one-time registration token."""

    token: Token
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=255,
                                         description="Host agent address (ip:port).")]
    arch: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    cpu_cores: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)] | None = None
    memory_mb: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] | None = None
    disk_gb: Annotated[int, msgspec.Meta(ge=0, le=1 << 31)] | None = None


class RefreshHostTokenRequest(Request):
    refresh_token: Token


class AddTagRequest(Request):
    tag: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class HostHasCapsulesErrorBody(msgspec.Struct, kw_only=True):
    code: str
    message: str
    sandbox_ids: list[str]


class HostHasCapsulesError(msgspec.Struct, kw_only=True):
    """409 of ``DELETE /v1/hosts/{id}`` without ``force``: the blocking capsules."""

    error: HostHasCapsulesErrorBody


class DeleteHostQuery(msgspec.Struct, kw_only=True):
    """Query parameters of ``DELETE /v1/hosts/{id}`` (documentation only)."""

    force: bool = False


__all__ = [
    "AddTagRequest", "CreateHostRequest", "CreateHostResponse", "DeleteHostQuery", "Host",
    "HostDeletePreview", "HostHasCapsulesError", "HostHasCapsulesErrorBody",
    "RefreshHostTokenRequest", "RefreshHostTokenResponse", "RegisterHostRequest",
    "RegisterHostResponse",
]
