"""Hosts: registration, host tokens, heartbeats, tags and deletion.

A host is a machine that runs capsules. *Regular* (platform) hosts are
created by platform admins and shared; *BYOC* hosts belong to one team,
which must have BYOC enabled (``PUT /v1/admin/teams/{id}/byoc``), and are
created by a platform admin or by an owner or admin of that team (their
active team). Who sees what: platform admins see every host; anyone else
sees only the BYOC hosts of their active team (another team's host, or a
platform host, answers 404). Changing a host needs the same rights as
creating it (403 ``insufficient_role`` for a plain member).

Credentials, from first contact to rotation:

* ``POST /v1/hosts`` (and ``POST /v1/hosts/{id}/token`` while the host is
  ``pending``) answers a one-time *registration token*, valid
  ``DOVECOTE_HOST_REGISTRATION_TTL_S`` (1 h). Only its SHA-256 is stored;
  issuing a new one voids the previous one.
* ``POST /v1/hosts/register`` consumes it, records the host's specs, sets it
  ``online`` and answers a *host JWT* (HS256, 7 days, the ``X-Host-Token``
  header) and a *refresh token* (60 days). The JWT names the host (``sub``)
  and its *token chain* (``chn``); it is not stored, but resolving it checks
  that the host still exists and the chain is not revoked.
* ``POST /v1/hosts/auth/refresh`` rotates the refresh token within its chain
  and issues a new JWT. Presenting a token that was already rotated means
  two parties hold it: the whole chain is revoked (every refresh token and
  every JWT of it), so the legitimate host must register again.

The JWT key is never in the database: ``DOVECOTE_HOST_JWT_SECRET`` when set
(needed when several auth processes share no data directory), else a random
key created once in ``<data_dir>/host-jwt.key`` with mode 0600.

Liveness: ``POST /v1/hosts/{id}/heartbeat`` (host token) records the time and
sets the host ``online``. :meth:`Hosts.serve_silence_monitor` runs in the
auth nursery and marks an ``online`` host silent for longer than
``DOVECOTE_HOST_SILENCE_S`` (90 s) ``unreachable``. Every status change is
audited and published on ``host.state.changed`` after its commit, so vmmgr
can mark the capsules of that host; becoming ``online`` (``unreachable`` or
``offline``) is also recorded as a ``host.up`` (``host.down``) lifecycle event
of the host's team (a platform host's: admins only). The gateway caches a
resolved host token for at most :data:`HOST_CACHE_S` seconds, which bounds
how long a deleted host or a revoked chain can still be used at the edge.

Deletion asks vmmgr (bus name ``vmmgr``) which capsules live on the host
(:class:`~dovecote.bus.messages.hosts.ListHostCapsules`): without ``force``
any capsule blocks it (409 ``host_has_sandboxes``); with ``force`` vmmgr is
asked to destroy them first. If no vmmgr answers within
``DOVECOTE_HOST_CAPSULE_QUERY_TIMEOUT_S`` the host is treated as having none:
the preview says ``capsules_unverified: true``, the deletion goes ahead with
a warning in the log and in its audit entry, and ``host.deleted`` tells
vmmgr to release whatever it still holds for the host.

The local host: a vmmgr started by ``dovecote up`` sends
:class:`~dovecote.bus.messages.hosts.EnsureLocalHost` (bus only) at start,
which creates or updates a platform host with its id, status ``online``;
:class:`~dovecote.bus.messages.hosts.LocalHostHeartbeat` keeps it online.
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import trio

from dovecote.bus import BusError
from dovecote.bus.messages import hosts as h
from dovecote.bus.messages.auth import Done, Resolved
from dovecote.bus.messages.common import Principal
from dovecote.bus.messages.events import EventActor, EventResource, LifecycleEvent, record_event
from dovecote.libs.config import BaseConfig, load_config
from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import rfc3339
from dovecote.services.auth import audit, crypto
from dovecote.services.auth.access import MANAGERS, active_team_role, is_platform_admin, require_session
from dovecote.services.auth.context import AuthContext
from dovecote.services.auth.host_tokens import load_jwt_key, sign_jwt, verify_jwt

log = get_logger("dovecote.auth.hosts")

HOST_CACHE_S = 5
MAX_TAGS = 32
SYSTEM = "system"
HOST_DOWN = ("unreachable", "offline")
"""Statuses recorded as a ``host.down`` lifecycle event (``online`` is ``host.up``)."""

HOST_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # usable as vmmgr's DOVECOTE_HOST_ID
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}$")
ARCH = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:/-]{0,63}$")

NOT_FOUND = ServiceError(404, "not_found", "host not found")
INVALID_TOKEN = ServiceError(401, "invalid_token", "the token is invalid, expired or already used")
INVALID_HOST_TOKEN = ServiceError(401, "unauthorized", "invalid or expired host token")
NEEDS_MANAGER = ServiceError(403, "insufficient_role",
                             "platform admin, or owner or admin of the host's team, required")

Seconds = Annotated[float, msgspec.Meta(gt=0)]


class HostsConfig(BaseConfig, kw_only=True):
    """Settings of hosts (``DOVECOTE_HOST_*``), read by the auth service."""

    host_silence_s: Seconds = 90.0
    host_registration_ttl_s: Annotated[int, msgspec.Meta(gt=0)] = 3600
    host_jwt_ttl_s: Annotated[int, msgspec.Meta(gt=0)] = 7 * 86400
    host_refresh_ttl_s: Annotated[int, msgspec.Meta(gt=0)] = 60 * 86400
    host_jwt_secret: str | None = None
    host_capsule_query_timeout_s: Seconds = 2.0
    host_destroy_timeout_s: Seconds = 60.0


# -- validation and bodies -----------------------------------------------------------


def check_host_id(host_id: str) -> str:
    """404 for anything that cannot be a host id (no lookup needed)."""
    if not HOST_ID.match(host_id):
        raise NOT_FOUND
    return host_id


def check_tag(tag: str) -> str:
    tag = tag.strip()
    if not TAG.match(tag):
        raise ServiceError(400, "invalid_tag",
                           "a tag has 1 to 64 characters: letters, digits and . _ : = - "
                           "(starting with a letter or digit)")
    return tag


def _check_label(value: str | None, what: str) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    if not LABEL.match(value):
        raise ServiceError(400, "invalid_request", f"{what} must have 1 to 64 characters: "
                           "letters, digits, space and _ . : / -")
    return value


def check_address(address: str | None) -> str:
    """``host:port`` (``[v6]:port``; port 0 when the agent listens nowhere), or 400."""
    address = (address or "").strip()
    host, sep, port = address.rpartition(":")
    if (not sep or not host or not 1 <= len(address) <= 255 or not address.isprintable()
            or " " in address or not port.isdigit() or int(port) > 65535):
        raise ServiceError(400, "invalid_request", "address must be host:port (ip:port)")
    return address


def check_specs(specs: h.HostSpecs, *, address_required: bool) -> h.HostSpecs:
    """The specs a host reports, validated (400 on a bad value)."""
    if specs.arch is not None and not ARCH.match(specs.arch):
        raise ServiceError(400, "invalid_request", "arch must have 1 to 32 characters [A-Za-z0-9_.-]")
    for name, value, top in (("cpu_cores", specs.cpu_cores, 1 << 16),
                             ("memory_mb", specs.memory_mb, 1 << 40),
                             ("disk_gb", specs.disk_gb, 1 << 31)):
        if value is not None and not 0 <= value <= top:
            raise ServiceError(400, "invalid_request", f"{name} must be between 0 and {top}")
    address = specs.address
    if address_required or address is not None:
        address = check_address(address)
    return msgspec.structs.replace(specs, address=address)


def host_body(row: dict[str, Any]) -> h.Host:
    return h.Host(
        id=row["id"], type=row["type"], team_id=row["team_id"], provider=row["provider"],
        availability_zone=row["availability_zone"], arch=row["arch"], cpu_cores=row["cpu_cores"],
        memory_mb=row["memory_mb"], disk_gb=row["disk_gb"], address=row["address"],
        status=row["status"],
        last_heartbeat_at=rfc3339(row["last_heartbeat_at"]) if row["last_heartbeat_at"] else None,
        created_by=row["created_by"], created_at=rfc3339(row["created_at"]),
        updated_at=rfc3339(row["updated_at"]))


def _scope(host: dict[str, Any]) -> tuple[str | None, str]:
    """(team_id, scope) of a host's audit entries."""
    return (host["team_id"], "team") if host["team_id"] else (None, "admin")


def _host_actor(host_id: str) -> tuple[str, str, str]:
    return ("host", host_id, host_id)


# -- who may see and change what ------------------------------------------------------


def _host(conn: Connection, actor: Principal, host_id: str, *, manage: bool,
          lock: bool = False) -> dict[str, Any]:
    """The host if the caller may see it (404 otherwise); with ``manage``, 403
    unless they may change it."""
    check_host_id(host_id)
    row = conn.execute(
        "SELECT h.* FROM hosts h LEFT JOIN teams t ON t.id = h.team_id "
        "WHERE h.id = %s AND (h.team_id IS NULL OR t.deleted_at IS NULL)"
        + (" FOR UPDATE OF h" if lock else ""), (host_id,)).fetchone()
    if row is None:
        raise NOT_FOUND
    host = dict(row)
    if is_platform_admin(conn, actor):
        return host
    role = active_team_role(conn, actor, host["team_id"]) if host["type"] == "byoc" else None
    if role is None:
        raise NOT_FOUND
    if manage and role not in MANAGERS:
        raise NEEDS_MANAGER
    return host


def _issue_registration_token(conn: Connection, host_id: str, ttl_s: int) -> str:
    token = crypto.new_token()
    conn.execute("UPDATE host_registration_tokens SET used_at = now() "
                 "WHERE host_id = %s AND used_at IS NULL", (host_id,))
    conn.execute("INSERT INTO host_registration_tokens (token_hash, host_id, expires_at) "
                 "VALUES (%s, %s, now() + make_interval(secs => %s))",
                 (crypto.token_hash(token), host_id, ttl_s))
    return token


class Hosts:
    """The handlers of ``/v1/hosts*``, host-token resolution and the local host."""

    def __init__(self, ctx: AuthContext) -> None:
        self.ctx = ctx
        # Its own variables, the service's data directory.
        self.config = msgspec.structs.replace(load_config(HostsConfig),
                                              data_dir=ctx.config.data_dir)
        self._key = load_jwt_key(self.config.data_dir, self.config.host_jwt_secret)

    # -- tokens -------------------------------------------------------------------

    def _jwt(self, host_id: str, chain_id: str) -> str:
        now = int(time.time())
        return sign_jwt({"iss": "dovecote", "typ": "host", "sub": host_id, "chn": chain_id,
                         "iat": now, "exp": now + self.config.host_jwt_ttl_s,
                         "jti": secrets.token_hex(8)}, self._key)

    def _new_chain(self, conn: Connection, host_id: str) -> tuple[str, str]:
        """A new token chain and its first refresh token: (chain_id, refresh_token)."""
        chain_id = crypto.new_id("hch")
        conn.execute("INSERT INTO host_token_chains (id, host_id) VALUES (%s, %s)",
                     (chain_id, host_id))
        return chain_id, self._new_refresh(conn, host_id, chain_id)

    def _new_refresh(self, conn: Connection, host_id: str, chain_id: str) -> str:
        token = crypto.new_token()
        conn.execute("INSERT INTO host_refresh_tokens (token_hash, chain_id, host_id, expires_at) "
                     "VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
                     (crypto.token_hash(token), chain_id, host_id, self.config.host_refresh_ttl_s))
        return token

    async def _state_changed(self, host_id: str, team_id: str | None, old: str, new: str) -> None:
        if old == new:
            return
        log.info("host status changed", extra={"host_id": host_id, "old": old, "new": new})
        at = rfc3339(datetime.now(UTC))
        await self.ctx.bus.publish(h.HOST_STATE_TOPIC, h.HostStateChanged(
            host_id=host_id, team_id=team_id, old_status=old, new_status=new, at=at))
        name = "host.up" if new == "online" else "host.down" if new in HOST_DOWN else None
        if name is not None and not (name == "host.down" and old in HOST_DOWN):
            # The host's team sees its BYOC host; a platform host ('') only admins.
            await record_event(self.ctx.bus.request, team_id or "", LifecycleEvent(
                event=name, resource=EventResource(id=host_id, type="host"),
                actor=EventActor(type="system"), timestamp=at, metadata={"from": old, "to": new}),
                timeout_s=2.0)

    # -- edge authentication --------------------------------------------------------

    async def resolve_token(self, msg: h.ResolveHostToken) -> Resolved:
        try:
            claims = verify_jwt(msg.token, self._key)
        except ValueError:
            raise INVALID_HOST_TOKEN from None
        host_id, chain_id = claims.get("sub"), claims.get("chn")
        if claims.get("typ") != "host" or not isinstance(host_id, str) or not isinstance(chain_id, str):
            raise INVALID_HOST_TOKEN

        def work(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(
                "SELECT h.id, h.team_id FROM hosts h "
                "JOIN host_token_chains c ON c.host_id = h.id AND c.id = %s "
                "LEFT JOIN teams t ON t.id = h.team_id "
                "WHERE h.id = %s AND c.revoked_at IS NULL "
                "AND (h.team_id IS NULL OR t.deleted_at IS NULL)", (chain_id, host_id)).fetchone()
            return dict(row) if row else None

        row = await self.ctx.db.transaction(work)
        if row is None:
            raise INVALID_HOST_TOKEN
        principal = Principal(auth_type="host", host_id=row["id"], team_id=row["team_id"] or "")
        remaining = int(claims["exp"] - time.time())
        return Resolved(principal=principal, expires_in_s=max(1, min(HOST_CACHE_S, remaining)))

    # -- create, list, get ------------------------------------------------------------

    async def create(self, msg: h.CreateHost) -> h.HostCreated:
        require_session(msg.actor)
        if msg.host_type not in ("regular", "byoc"):
            raise ServiceError(400, "invalid_request", "type must be regular or byoc")
        provider = _check_label(msg.provider, "provider")
        zone = _check_label(msg.availability_zone, "availability_zone")
        if msg.host_type == "regular" and msg.team_id:
            raise ServiceError(400, "invalid_request", "team_id is only for byoc hosts")
        if msg.host_type == "byoc" and not msg.team_id:
            raise ServiceError(400, "invalid_request", "team_id is required for byoc hosts")

        def work(conn: Connection) -> h.CreateHostResponse:
            admin = is_platform_admin(conn, msg.actor)
            team_id = msg.team_id if msg.host_type == "byoc" else None
            if team_id is None:
                if not admin:
                    raise ServiceError(403, "forbidden", "only platform admins can create regular hosts")
            else:
                team = conn.execute("SELECT byoc FROM teams WHERE id = %s AND deleted_at IS NULL "
                                    "FOR SHARE", (team_id,)).fetchone()
                if not admin:
                    role = active_team_role(conn, msg.actor, team_id)
                    if role is None:
                        raise ServiceError(403, "forbidden", "you can only create hosts for your "
                                           "active team; use switch-team first")
                    if role not in MANAGERS:
                        raise NEEDS_MANAGER
                if team is None:
                    raise ServiceError(404, "not_found", "team not found")
                if not team["byoc"]:
                    raise ServiceError(403, "byoc_not_enabled",
                                       "BYOC is not enabled for this team; ask a platform admin")
            host_id = f"host-{secrets.token_hex(8)}"
            row = conn.execute(
                "INSERT INTO hosts (id, type, team_id, provider, availability_zone, created_by) "
                "VALUES (%s, %s, %s, %s, %s, %s) RETURNING *",
                (host_id, msg.host_type, team_id, provider, zone, msg.actor.user_id)).fetchone()
            assert row is not None
            token = _issue_registration_token(conn, host_id, self.config.host_registration_ttl_s)
            audit_team, scope = _scope(dict(row))
            audit.write(conn, actor=msg.actor, action="create", resource_type="host",
                        resource_id=host_id, team_id=audit_team, scope=scope,
                        metadata={"type": msg.host_type, "provider": provider,
                                  "availability_zone": zone})
            return h.CreateHostResponse(host=host_body(dict(row)), registration_token=token)

        return h.HostCreated(body=await self.ctx.db.transaction(work))

    async def list_hosts(self, msg: h.ListHosts) -> h.HostsReply:
        require_session(msg.actor)

        def work(conn: Connection) -> list[h.Host]:
            if is_platform_admin(conn, msg.actor):
                rows = conn.execute(
                    "SELECT h.* FROM hosts h LEFT JOIN teams t ON t.id = h.team_id "
                    "WHERE h.team_id IS NULL OR t.deleted_at IS NULL "
                    "ORDER BY h.created_at, h.id").fetchall()
            elif active_team_role(conn, msg.actor, msg.actor.team_id) is not None:
                rows = conn.execute("SELECT * FROM hosts WHERE type = 'byoc' AND team_id = %s "
                                    "ORDER BY created_at, id", (msg.actor.team_id,)).fetchall()
            else:
                rows = []
            return [host_body(dict(r)) for r in rows]

        return h.HostsReply(hosts=await self.ctx.db.transaction(work))

    async def get(self, msg: h.GetHost) -> h.HostReply:
        require_session(msg.actor)
        row = await self.ctx.db.transaction(
            lambda conn: _host(conn, msg.actor, msg.host_id, manage=False))
        return h.HostReply(body=host_body(row))

    async def regenerate_token(self, msg: h.RegenerateHostToken) -> h.HostCreated:
        require_session(msg.actor)

        def work(conn: Connection) -> h.CreateHostResponse:
            host = _host(conn, msg.actor, msg.host_id, manage=True, lock=True)
            if host["status"] != "pending":
                raise ServiceError(409, "host_not_pending",
                                   "the host has registered; delete it to register the machine again")
            token = _issue_registration_token(conn, host["id"], self.config.host_registration_ttl_s)
            team_id, scope = _scope(host)
            audit.write(conn, actor=msg.actor, action="regenerate_token", resource_type="host",
                        resource_id=host["id"], team_id=team_id, scope=scope)
            return h.CreateHostResponse(host=host_body(host), registration_token=token)

        return h.HostCreated(body=await self.ctx.db.transaction(work))

    # -- registration, refresh, heartbeat ------------------------------------------------

    async def register_host(self, msg: h.RegisterHost) -> h.HostRegistered:
        specs = check_specs(msg.specs, address_required=True)
        if not 1 <= len(msg.token) <= 256:
            raise INVALID_TOKEN

        def work(conn: Connection) -> tuple[dict[str, Any], str, str]:
            row = conn.execute(
                "SELECT r.host_id, hs.status FROM host_registration_tokens r "
                "JOIN hosts hs ON hs.id = r.host_id LEFT JOIN teams t ON t.id = hs.team_id "
                "WHERE r.token_hash = %s AND r.used_at IS NULL AND r.expires_at > now() "
                "AND (hs.team_id IS NULL OR t.deleted_at IS NULL) FOR UPDATE OF r, hs",
                (crypto.token_hash(msg.token),)).fetchone()
            if row is None or row["status"] != "pending":
                raise INVALID_TOKEN
            host_id = row["host_id"]
            conn.execute("UPDATE host_registration_tokens SET used_at = now() WHERE token_hash = %s",
                         (crypto.token_hash(msg.token),))
            host = conn.execute(
                "UPDATE hosts SET arch = %s, cpu_cores = %s, memory_mb = %s, disk_gb = %s, "
                "address = %s, status = 'online', last_heartbeat_at = now(), updated_at = now() "
                "WHERE id = %s RETURNING *",
                (specs.arch, specs.cpu_cores, specs.memory_mb, specs.disk_gb, specs.address,
                 host_id)).fetchone()
            assert host is not None
            chain_id, refresh = self._new_chain(conn, host_id)
            team_id, scope = _scope(dict(host))
            audit.write(conn, actor=None, action="register", resource_type="host",
                        resource_id=host_id, team_id=team_id, scope=scope,
                        actor_override=_host_actor(host_id),
                        metadata={"arch": specs.arch, "cpu_cores": specs.cpu_cores,
                                  "memory_mb": specs.memory_mb, "disk_gb": specs.disk_gb,
                                  "address": specs.address, "ip": msg.client.ip})
            return dict(host), chain_id, refresh

        host, chain_id, refresh = await self.ctx.db.transaction(work)
        await self._state_changed(host["id"], host["team_id"], "pending", "online")
        return h.HostRegistered(body=h.RegisterHostResponse(
            host=host_body(host), token=self._jwt(host["id"], chain_id), refresh_token=refresh))

    async def refresh(self, msg: h.RefreshHostToken) -> h.HostTokenRefreshed:
        if not 1 <= len(msg.refresh_token) <= 256:
            raise INVALID_TOKEN
        token_hash = crypto.token_hash(msg.refresh_token)

        def work(conn: Connection) -> tuple[str, dict[str, Any] | None, str, str]:
            row = conn.execute(
                "SELECT r.chain_id, r.rotated_at, r.expires_at > now() AS live, "
                "c.revoked_at AS chain_revoked, hs.id AS host_id "
                "FROM host_refresh_tokens r JOIN host_token_chains c ON c.id = r.chain_id "
                "JOIN hosts hs ON hs.id = r.host_id LEFT JOIN teams t ON t.id = hs.team_id "
                "WHERE r.token_hash = %s AND (hs.team_id IS NULL OR t.deleted_at IS NULL) "
                "FOR UPDATE OF r, c", (token_hash,)).fetchone()
            if row is None or row["chain_revoked"] is not None or not row["live"]:
                return "invalid", None, "", ""
            host = dict(conn.execute("SELECT * FROM hosts WHERE id = %s",
                                     (row["host_id"],)).fetchone() or {})
            team_id, scope = _scope(host)
            if row["rotated_at"] is not None:
                # Reuse of a rotated token: someone else holds the chain. End it.
                conn.execute("UPDATE host_token_chains SET revoked_at = now(), "
                             "revoked_reason = 'refresh_token_reuse' WHERE id = %s",
                             (row["chain_id"],))
                audit.write(conn, actor=None, action="refresh_token_reuse", resource_type="host",
                            resource_id=host["id"], team_id=team_id, scope=scope, status="failure",
                            actor_override=_host_actor(host["id"]),
                            metadata={"chain_revoked": row["chain_id"], "ip": msg.client.ip})
                return "reused", host, "", ""
            conn.execute("UPDATE host_refresh_tokens SET rotated_at = now() WHERE token_hash = %s",
                         (token_hash,))
            refresh = self._new_refresh(conn, host["id"], row["chain_id"])
            audit.write(conn, actor=None, action="refresh_token", resource_type="host",
                        resource_id=host["id"], team_id=team_id, scope=scope,
                        actor_override=_host_actor(host["id"]), metadata={"ip": msg.client.ip})
            return "ok", host, row["chain_id"], refresh

        outcome, host, chain_id, refresh = await self.ctx.db.transaction(work)
        if outcome == "reused":
            assert host is not None
            log.warning("a rotated host refresh token was reused; its chain is revoked",
                        extra={"host_id": host["id"], "ip": msg.client.ip})
        if outcome != "ok" or host is None:
            raise ServiceError(401, "invalid_token",
                               "the refresh token is invalid, expired or revoked")
        return h.HostTokenRefreshed(body=h.RefreshHostTokenResponse(
            host=host_body(host), token=self._jwt(host["id"], chain_id), refresh_token=refresh))

    async def _beat(self, host_id: str, *, actor: tuple[str, str, str] | None,
                    missing: ServiceError) -> None:
        def work(conn: Connection) -> tuple[str, str, str | None]:
            row = conn.execute("SELECT status, team_id FROM hosts WHERE id = %s FOR UPDATE",
                               (host_id,)).fetchone()
            if row is None:
                raise missing
            old = row["status"]
            new = old if old == "draining" else "online"
            conn.execute("UPDATE hosts SET last_heartbeat_at = now(), status = %s, "
                         "updated_at = CASE WHEN status = %s THEN updated_at ELSE now() END "
                         "WHERE id = %s", (new, new, host_id))
            if new != old:
                team_id, scope = (row["team_id"], "team") if row["team_id"] else (None, "admin")
                audit.write(conn, actor=None, action="status_change", resource_type="host",
                            resource_id=host_id, team_id=team_id, scope=scope,
                            actor_override=actor or _host_actor(host_id),
                            metadata={"old_status": old, "new_status": new, "cause": "heartbeat"})
            return old, new, row["team_id"]

        old, new, team_id = await self.ctx.db.transaction(work)
        await self._state_changed(host_id, team_id, old, new)

    async def heartbeat(self, msg: h.HostHeartbeat) -> Done:
        if msg.actor.auth_type != "host" or not msg.actor.host_id:
            raise INVALID_HOST_TOKEN
        if msg.host_id != msg.actor.host_id:
            raise ServiceError(403, "host_mismatch", "the host id does not match the host token")
        await self._beat(msg.host_id, actor=None, missing=INVALID_HOST_TOKEN)
        return Done()

    # -- deletion -------------------------------------------------------------------------

    async def _ask_vmmgr(self, message: h.ListHostCapsules | h.DestroyHostCapsules,
                         timeout_s: float) -> tuple[list[str], bool]:
        """(capsule ids, answered). Unanswered means "none known" and is logged."""
        try:
            reply = await self.ctx.bus.request("vmmgr", message, timeout=timeout_s)
        except BusError as exc:
            log.warning("vmmgr did not answer about the capsules of a host; treating as none",
                        extra={"host_id": message.host_id, "request": type(message).__name__,
                               "error": str(exc)})
            return [], False
        if not isinstance(reply, h.HostCapsules):
            log.warning("vmmgr answered a host capsule request unexpectedly; treating as none",
                        extra={"host_id": message.host_id, "reply": type(reply).__name__})
            return [], False
        return list(reply.capsule_ids), True

    async def delete_preview(self, msg: h.GetHostDeletePreview) -> h.HostDeletePreviewReply:
        require_session(msg.actor)
        host = await self.ctx.db.transaction(
            lambda conn: _host(conn, msg.actor, msg.host_id, manage=True))
        ids, answered = await self._ask_vmmgr(h.ListHostCapsules(host_id=host["id"]),
                                              self.config.host_capsule_query_timeout_s)
        return h.HostDeletePreviewReply(body=h.HostDeletePreview(
            host=host_body(host), sandbox_ids=ids, capsules_unverified=not answered))

    async def delete(self, msg: h.DeleteHost) -> Done | h.HostDeleteBlocked:
        require_session(msg.actor)
        host = await self.ctx.db.transaction(
            lambda conn: _host(conn, msg.actor, msg.host_id, manage=True))
        ids, answered = await self._ask_vmmgr(h.ListHostCapsules(host_id=host["id"]),
                                              self.config.host_capsule_query_timeout_s)
        if ids and not msg.force:
            return h.HostDeleteBlocked(
                message=f"the host has {len(ids)} active capsule(s); delete them or use ?force=true",
                sandbox_ids=ids)
        destroyed: list[str] = []
        if ids:
            destroyed, answered = await self._ask_vmmgr(
                h.DestroyHostCapsules(host_id=host["id"], actor=msg.actor),
                self.config.host_destroy_timeout_s)

        def work(conn: Connection) -> dict[str, Any]:
            current = _host(conn, msg.actor, msg.host_id, manage=True, lock=True)
            conn.execute("DELETE FROM hosts WHERE id = %s", (current["id"],))
            team_id, scope = _scope(current)
            audit.write(conn, actor=msg.actor, action="delete", resource_type="host",
                        resource_id=current["id"], team_id=team_id, scope=scope,
                        metadata={"force": msg.force, "status": current["status"],
                                  "capsules": ids, "capsules_destroyed": destroyed,
                                  "capsules_unverified": not answered})
            return current

        gone = await self.ctx.db.transaction(work)
        if not answered:
            log.warning("host deleted without confirmation from vmmgr about its capsules",
                        extra={"host_id": gone["id"], "force": msg.force})
        await self.ctx.bus.publish(h.HOST_DELETED_TOPIC, h.HostDeleted(
            host_id=gone["id"], team_id=gone["team_id"], force=msg.force, capsule_ids=ids))
        return Done()

    # -- tags -----------------------------------------------------------------------------

    async def list_tags(self, msg: h.ListHostTags) -> h.HostTagsReply:
        require_session(msg.actor)

        def work(conn: Connection) -> list[str]:
            host = _host(conn, msg.actor, msg.host_id, manage=False)
            rows = conn.execute("SELECT tag FROM host_tags WHERE host_id = %s ORDER BY tag",
                                (host["id"],)).fetchall()
            return [r["tag"] for r in rows]

        return h.HostTagsReply(tags=await self.ctx.db.transaction(work))

    async def add_tag(self, msg: h.AddHostTag) -> Done:
        require_session(msg.actor)
        tag = check_tag(msg.tag)

        def work(conn: Connection) -> None:
            host = _host(conn, msg.actor, msg.host_id, manage=True, lock=True)
            count = conn.execute("SELECT count(*) AS n FROM host_tags WHERE host_id = %s",
                                 (host["id"],)).fetchone()
            added = conn.execute("INSERT INTO host_tags (host_id, tag) VALUES (%s, %s) "
                                 "ON CONFLICT DO NOTHING", (host["id"], tag)).rowcount
            if added and count is not None and count["n"] >= MAX_TAGS:
                raise ServiceError(400, "too_many_tags", f"a host has at most {MAX_TAGS} tags")
            if added:
                team_id, scope = _scope(host)
                audit.write(conn, actor=msg.actor, action="add_tag", resource_type="host",
                            resource_id=host["id"], team_id=team_id, scope=scope,
                            metadata={"tag": tag})

        await self.ctx.db.transaction(work)
        return Done()

    async def remove_tag(self, msg: h.RemoveHostTag) -> Done:
        require_session(msg.actor)

        def work(conn: Connection) -> None:
            host = _host(conn, msg.actor, msg.host_id, manage=True, lock=True)
            removed = conn.execute("DELETE FROM host_tags WHERE host_id = %s AND tag = %s",
                                   (host["id"], msg.tag)).rowcount
            if not removed:
                raise ServiceError(404, "not_found", "the host has no such tag")
            team_id, scope = _scope(host)
            audit.write(conn, actor=msg.actor, action="remove_tag", resource_type="host",
                        resource_id=host["id"], team_id=team_id, scope=scope,
                        metadata={"tag": msg.tag})

        await self.ctx.db.transaction(work)
        return Done()

    # -- the local host (bus only) -----------------------------------------------------------

    async def ensure_local(self, msg: h.EnsureLocalHost) -> h.HostReply:
        if not HOST_ID.match(msg.host_id):
            raise ServiceError(400, "invalid_request", "invalid host id")
        specs = check_specs(msg.specs, address_required=False)

        def work(conn: Connection) -> tuple[dict[str, Any], str]:
            row = conn.execute(
                "INSERT INTO hosts (id, type, arch, cpu_cores, memory_mb, disk_gb, address, status, "
                "last_heartbeat_at, created_by) VALUES (%s, 'regular', %s, %s, %s, %s, %s, 'online', "
                "now(), %s) ON CONFLICT (id) DO NOTHING RETURNING *",
                (msg.host_id, specs.arch, specs.cpu_cores, specs.memory_mb, specs.disk_gb,
                 specs.address, SYSTEM)).fetchone()
            if row is not None:
                audit.write(conn, actor=None, action="create_local", resource_type="host",
                            resource_id=msg.host_id, scope="admin",
                            metadata=msgspec.structs.asdict(specs))
                return dict(row), "pending"
            old = conn.execute("SELECT status FROM hosts WHERE id = %s FOR UPDATE",
                               (msg.host_id,)).fetchone()
            assert old is not None
            row = conn.execute(
                "UPDATE hosts SET arch = COALESCE(%s, arch), cpu_cores = COALESCE(%s, cpu_cores), "
                "memory_mb = COALESCE(%s, memory_mb), disk_gb = COALESCE(%s, disk_gb), "
                "address = COALESCE(%s, address), "
                "status = CASE WHEN status = 'draining' THEN status ELSE 'online' END, "
                "last_heartbeat_at = now(), updated_at = now() WHERE id = %s RETURNING *",
                (specs.arch, specs.cpu_cores, specs.memory_mb, specs.disk_gb, specs.address,
                 msg.host_id)).fetchone()
            assert row is not None
            if row["status"] != old["status"]:
                team_id, scope = _scope(dict(row))
                audit.write(conn, actor=None, action="status_change", resource_type="host",
                            resource_id=msg.host_id, team_id=team_id, scope=scope,
                            metadata={"old_status": old["status"], "new_status": row["status"],
                                      "cause": "local_start"})
            return dict(row), old["status"]

        host, old = await self.ctx.db.transaction(work)
        await self._state_changed(host["id"], host["team_id"], old, host["status"])
        return h.HostReply(body=host_body(host))

    async def local_heartbeat(self, msg: h.LocalHostHeartbeat) -> Done:
        await self._beat(check_host_id(msg.host_id), actor=("system", "", "vmmgr"),
                         missing=NOT_FOUND)
        return Done()

    # -- silence ---------------------------------------------------------------------------

    def mark_silent(self, conn: Connection) -> list[dict[str, Any]]:
        """Mark ``online`` hosts silent for longer than the limit ``unreachable``."""
        rows = conn.execute(
            "UPDATE hosts SET status = 'unreachable', updated_at = now() "
            "WHERE status = 'online' AND last_heartbeat_at < now() - make_interval(secs => %s) "
            "RETURNING id, team_id, last_heartbeat_at", (self.config.host_silence_s,)).fetchall()
        for row in rows:
            team_id, scope = _scope(dict(row))
            audit.write(conn, actor=None, action="status_change", resource_type="host",
                        resource_id=row["id"], team_id=team_id, scope=scope,
                        metadata={"old_status": "online", "new_status": "unreachable",
                                  "cause": "silence",
                                  "last_heartbeat_at": rfc3339(row["last_heartbeat_at"]) or ""})
        return [dict(r) for r in rows]

    async def serve_silence_monitor(self, *,
                                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                                    ) -> None:
        """Every few seconds, mark silent hosts ``unreachable`` and publish it."""
        task_status.started()
        stopping = self.ctx.service.stopping
        interval = max(0.5, min(self.config.host_silence_s / 3, 10.0))
        while not stopping.is_set():
            try:
                for row in await self.ctx.db.transaction(self.mark_silent):
                    await self._state_changed(row["id"], row["team_id"], "online", "unreachable")
            except Exception:  # the database may be briefly away: try again next round
                log.exception("host silence check failed")
            with trio.move_on_after(interval):
                await stopping.wait()

    async def placement_hosts(self, msg: h.ListPlacementHosts) -> h.PlacementHosts:
        """Online hosts for a capsule of ``msg.team_id``: its BYOC hosts and the regular ones."""
        rows = await self.ctx.db.fetchall(
            "SELECT h.id, h.type, h.team_id, h.cpu_cores, h.memory_mb, "
            "  coalesce(array_agg(t.tag ORDER BY t.tag) FILTER (WHERE t.tag IS NOT NULL), '{}') AS tags "
            "FROM hosts h LEFT JOIN host_tags t ON t.host_id = h.id "
            "WHERE h.status = 'online' AND (h.type = 'regular' OR h.team_id = %s) "
            "GROUP BY h.id ORDER BY h.id", (msg.team_id,))
        return h.PlacementHosts(hosts=[h.PlacementHost(
            id=r["id"], type=r["type"], team_id=r["team_id"] or "", tags=list(r["tags"]),
            cpu_cores=r["cpu_cores"], memory_mb=r["memory_mb"]) for r in rows])

    def register(self, handle: Any) -> None:
        """Register every handler and start the silence monitor in the service nursery."""
        for message_type, handler in {
            h.ResolveHostToken: self.resolve_token, h.CreateHost: self.create,
            h.ListHosts: self.list_hosts, h.GetHost: self.get, h.DeleteHost: self.delete,
            h.GetHostDeletePreview: self.delete_preview,
            h.RegenerateHostToken: self.regenerate_token, h.RegisterHost: self.register_host,
            h.HostHeartbeat: self.heartbeat, h.RefreshHostToken: self.refresh,
            h.ListHostTags: self.list_tags, h.AddHostTag: self.add_tag,
            h.RemoveHostTag: self.remove_tag, h.EnsureLocalHost: self.ensure_local,
            h.LocalHostHeartbeat: self.local_heartbeat, h.ListPlacementHosts: self.placement_hosts,
        }.items():
            handle(message_type, handler)
        self.ctx.service.nursery.start_soon(self.serve_silence_monitor)
