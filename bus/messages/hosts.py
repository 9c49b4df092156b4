"""Messages of hosts: registration, host tokens, heartbeats, tags (bus name ``auth``).

Auth owns the host records. The gateway forwards each ``/v1/hosts*`` request
as one message carrying the caller (:class:`Principal`) and, for state
changes, the HTTP client. Replies carry the reference's bodies (the plain
Structs named like its schemas) or :class:`~dovecote.bus.messages.auth.Done`
for 204; refusals are a :class:`~dovecote.bus.messages.common.Failure`.

Host credentials: ``POST /v1/hosts`` answers a one-time *registration token*
(1 h); :class:`RegisterHost` trades it for a host JWT (7 days, the
``X-Host-Token`` header, resolved at the edge by :class:`ResolveHostToken`)
and a refresh token (60 days, rotated by :class:`RefreshHostToken`).

Bus-only, for vmmgr: :class:`EnsureLocalHost` creates or updates the platform
host record of a vmmgr started by ``dovecote up`` (status ``online``), and
:class:`LocalHostHeartbeat` keeps it online without an HTTP token.

Auth asks vmmgr (bus name ``vmmgr``, any worker: the capsule table is shared)
which capsules block a host's deletion (:class:`ListHostCapsules`) and, on a
forced delete, to destroy them (:class:`DestroyHostCapsules`); both answer
:class:`HostCapsules`. When no vmmgr answers in time auth treats the host as
having no capsules and says so (``capsules_unverified`` in the preview, a
warning in its log).

Events (published by auth after the commit):

* ``host.state.changed`` (:data:`HOST_STATE_TOPIC`): :class:`HostStateChanged`
  whenever a host's status changes (registration, heartbeat after silence,
  silence longer than ``DOVECOTE_HOST_SILENCE_S`` → ``unreachable``), so
  vmmgr can mark the capsules of that host;
* ``host.deleted`` (:data:`HOST_DELETED_TOPIC`): :class:`HostDeleted`, so
  vmmgr can release whatever it still holds for the host.
"""

from __future__ import annotations

import msgspec

from .base import Family, Message
from .common import ClientInfo, Principal

HOST_STATE_TOPIC = "host.state.changed"
HOST_DELETED_TOPIC = "host.deleted"

# -- response bodies (the reference's schemas) ---------------------------------


class Host(msgspec.Struct, kw_only=True):
    """The reference's ``Host``."""

    id: str
    type: str
    team_id: str | None = None
    provider: str | None = None
    availability_zone: str | None = None
    arch: str | None = None
    cpu_cores: int | None = None
    memory_mb: int | None = None
    disk_gb: int | None = None
    address: str | None = None
    status: str
    last_heartbeat_at: str | None = None
    created_by: str
    created_at: str
    updated_at: str


class CreateHostResponse(msgspec.Struct, kw_only=True):
    host: Host
    registration_token: str


class RegisterHostResponse(msgspec.Struct, kw_only=True):
    host: Host
    token: str
    refresh_token: str


class RefreshHostTokenResponse(msgspec.Struct, kw_only=True):
    host: Host
    token: str
    refresh_token: str


class HostDeletePreview(msgspec.Struct, kw_only=True):
    """The reference's ``HostDeletePreview``; ``capsules_unverified`` is ours:
    true when no vmmgr answered, so ``sandbox_ids`` may be incomplete."""

    host: Host
    sandbox_ids: list[str]
    capsules_unverified: bool = False


class HostSpecs(msgspec.Struct, kw_only=True):
    """What a host reports about itself at registration."""

    arch: str | None = None
    cpu_cores: int | None = None
    memory_mb: int | None = None
    disk_gb: int | None = None
    address: str | None = None


# -- edge authentication ---------------------------------------------------------


class ResolveHostToken(Message, tag="auth.hosts.resolve_token", kw_only=True):
    """Which host holds this ``X-Host-Token`` JWT? Answers ``auth.Resolved``."""

    token: str


# -- the hosts API -----------------------------------------------------------------


class CreateHost(Message, tag="auth.hosts.create", kw_only=True):
    actor: Principal
    host_type: str  # "type" is the bus's tag field
    team_id: str | None = None
    provider: str | None = None
    availability_zone: str | None = None
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class HostCreated(Message, tag="auth.hosts.created", kw_only=True):
    """Answer of :class:`CreateHost` and :class:`RegenerateHostToken` (HTTP 201)."""

    body: CreateHostResponse


class ListHosts(Message, tag="auth.hosts.list", kw_only=True):
    actor: Principal


class HostsReply(Message, tag="auth.hosts.list_reply", kw_only=True):
    hosts: list[Host]


class GetHost(Message, tag="auth.hosts.get", kw_only=True):
    actor: Principal
    host_id: str


class HostReply(Message, tag="auth.hosts.host_reply", kw_only=True):
    body: Host


class DeleteHost(Message, tag="auth.hosts.delete", kw_only=True):
    """Answers ``auth.Done``, or :class:`HostDeleteBlocked` (409) without ``force``."""

    actor: Principal
    host_id: str
    force: bool = False
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class HostDeleteBlocked(Message, tag="auth.hosts.delete_blocked", kw_only=True):
    """The host has capsules and ``force`` was not set (the reference's
    ``HostHasCapsulesError``, HTTP 409)."""

    message: str
    sandbox_ids: list[str]


class GetHostDeletePreview(Message, tag="auth.hosts.delete_preview", kw_only=True):
    actor: Principal
    host_id: str


class HostDeletePreviewReply(Message, tag="auth.hosts.delete_preview_reply", kw_only=True):
    body: HostDeletePreview


class RegenerateHostToken(Message, tag="auth.hosts.regenerate_token", kw_only=True):
    actor: Principal
    host_id: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class RegisterHost(Message, tag="auth.hosts.register", kw_only=True):
    """``POST /v1/hosts/register``: the registration token is the credential."""

    token: str
    specs: HostSpecs
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class HostRegistered(Message, tag="auth.hosts.registered", kw_only=True):
    body: RegisterHostResponse


class HostHeartbeat(Message, tag="auth.hosts.heartbeat", kw_only=True):
    """``actor`` is the host principal of the ``X-Host-Token``; ``host_id`` the path's."""

    actor: Principal
    host_id: str


class RefreshHostToken(Message, tag="auth.hosts.refresh", kw_only=True):
    refresh_token: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class HostTokenRefreshed(Message, tag="auth.hosts.refreshed", kw_only=True):
    body: RefreshHostTokenResponse


class ListHostTags(Message, tag="auth.hosts.tags", kw_only=True):
    actor: Principal
    host_id: str


class HostTagsReply(Message, tag="auth.hosts.tags_reply", kw_only=True):
    tags: list[str]


class AddHostTag(Message, tag="auth.hosts.add_tag", kw_only=True):
    actor: Principal
    host_id: str
    tag: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


class RemoveHostTag(Message, tag="auth.hosts.remove_tag", kw_only=True):
    actor: Principal
    host_id: str
    tag: str
    client: ClientInfo = msgspec.field(default_factory=ClientInfo)


# -- bus only: the local host of ``dovecote up`` ------------------------------------


class EnsureLocalHost(Message, tag="auth.hosts.ensure_local", kw_only=True):
    """Create or update the platform host ``host_id`` with ``specs``, status
    ``online`` (answers :class:`HostReply`). Idempotent: vmmgr sends it at start."""

    host_id: str
    specs: HostSpecs = msgspec.field(default_factory=HostSpecs)


class LocalHostHeartbeat(Message, tag="auth.hosts.local_heartbeat", kw_only=True):
    """The bus twin of ``POST /v1/hosts/{id}/heartbeat`` for a vmmgr of this
    suite (answers ``auth.Done``; 404 if the host was never ensured)."""

    host_id: str


class PlacementHost(msgspec.Struct, kw_only=True):
    """An online host a capsule of the asking team may be placed on."""

    id: str
    type: str
    team_id: str = ""
    tags: list[str] = []
    cpu_cores: int | None = None
    memory_mb: int | None = None


class ListPlacementHosts(Message, tag="auth.hosts.placement", kw_only=True):
    """The online hosts that may run a capsule of ``team_id`` (bus only, asked by vmmgr):
    the team's own BYOC hosts and the platform's regular hosts (answers
    :class:`PlacementHosts`)."""

    team_id: str


class PlacementHosts(Message, tag="auth.hosts.placement_reply", kw_only=True):
    hosts: list[PlacementHost]


# -- asked of vmmgr -------------------------------------------------------------------


class ListHostCapsules(Message, tag="vmmgr.hosts.list_capsules", kw_only=True):
    """Which capsules (not destroyed) live on ``host_id``? Answers :class:`HostCapsules`."""

    host_id: str


class DestroyHostCapsules(Message, tag="vmmgr.hosts.destroy_capsules", kw_only=True):
    """Destroy every capsule of ``host_id`` (forced host deletion). Answers
    :class:`HostCapsules` with the ids destroyed."""

    host_id: str
    actor: Principal | None = None


class HostCapsules(Message, tag="vmmgr.hosts.capsules", kw_only=True):
    capsule_ids: list[str]


# -- events ---------------------------------------------------------------------------


class HostStateChanged(Message, tag="auth.hosts.state_changed", kw_only=True):
    """Event on ``host.state.changed``. ``team_id`` is None for platform hosts;
    ``at`` is RFC 3339."""

    host_id: str
    team_id: str | None = None
    old_status: str
    new_status: str
    at: str = ""


class HostDeleted(Message, tag="auth.hosts.deleted", kw_only=True):
    """Event on ``host.deleted``: the host record is gone (``force`` as requested)."""

    host_id: str
    team_id: str | None = None
    force: bool = False
    capsule_ids: list[str] = []


FAMILY = Family("hosts", __name__)
"""The hosts messages and their one Decoder (define every message above this line)."""
