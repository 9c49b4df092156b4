"""Notification channels: the teams' channels and the ``/v1/channels*`` handlers.

A channel belongs to one team (the caller's active team): another team's
channel is 404, exactly like one that does not exist. Who may do what:

* any member of the team lists and reads its channels;
* owners and admins create, update, rotate, delete and test them (403
  ``insufficient_role`` for a member): a channel's config holds credentials
  and points the server at a URL of the caller's choosing.

Validation answers 400 naming the field (``config.webhook_url is required
for provider slack``, ``events[1] ...``); names are unique per team (409
``channel_name_taken``). The provider-specific rules are in
:mod:`.providers`.

Secrets at rest: the whole config is sealed with pynacl's SecretBox
(XSalsa20-Poly1305) together with the channel's id, so a sealed config moved
to another row does not open. The 32-byte key is never in the database:
``DOVECOTE_CHANNEL_KEY`` (base64) when set (required when notifiers share no
data directory), else ``<data_dir>/channel.key`` created once with mode 0600.
Losing the key loses the configs (deliveries then fail with
``config_unreadable``); rotating it is not supported yet.

The generic webhook's ``secret`` is generated when omitted. It is answered
once, by the creation (and by a config rotation that had it generated), and
never again: replies build :class:`~dovecote.bus.messages.channels.ChannelResponse`
without config, and no log line carries a config value.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nacl.exceptions
import nacl.secret

from dovecote.bus.messages import channels as c
from dovecote.bus.messages.common import Principal
from dovecote.bus.messages.events import CHANNEL_EVENT_NAMES
from dovecote.libs import keyfile
from dovecote.libs.errors import ServiceError, UniqueViolation
from dovecote.libs.logs import get_logger
from dovecote.libs.timefmt import rfc3339

from . import providers
from .providers import InvalidConfig, ProviderSettings

log = get_logger("dovecote.notifier.channels")

KEY_FILE = "channel.key"
MANAGERS = ("owner", "admin")
MEMBERS = ("owner", "admin", "member")
MAX_NAME = 100
MAX_ATTEMPTS_LISTED = 1000

NOT_FOUND = ServiceError(404, "not_found", "channel not found")
NEEDS_MANAGER = ServiceError(403, "insufficient_role", "admin or owner role required")
NO_TEAM = ServiceError(403, "forbidden", "channels belong to a team: sign in to one")

_CHANNEL_COLUMNS = "id, team_id, name, provider, events, created_at, updated_at"


class SealedConfig(msgspec.Struct, kw_only=True):
    """The plaintext inside a channel's SecretBox."""

    channel_id: str
    config: dict[str, str]


_encode = msgspec.json.Encoder().encode
_decode_sealed = msgspec.json.Decoder(SealedConfig).decode


class ConfigUnreadable(Exception):
    """A sealed config that does not open with this key (or belongs to another channel)."""


# -- the key ------------------------------------------------------------------------------


def load_channel_key(key_b64: str | None, data_dir: str) -> bytes:
    """The SecretBox key: ``DOVECOTE_CHANNEL_KEY`` (base64 of 32 bytes), else ``<data_dir>/channel.key``.

    The file is created once (mode 0600, atomically: written aside, then
    hard-linked into place, so concurrent starts agree on one key).

    Raises:
        ConfigError: the variable or the file does not hold 32 base64 bytes.
    """
    return keyfile.secret_key(key_b64, Path(data_dir) / KEY_FILE, variable="DOVECOTE_CHANNEL_KEY",
                              what="the channel key file")


class Sealer:
    """Seals and opens channel configs with one SecretBox key."""

    def __init__(self, key: bytes) -> None:
        self._box = nacl.secret.SecretBox(key)
        self.key_id = hashlib.sha256(key).hexdigest()[:16]

    def seal(self, channel_id: str, config: dict[str, str]) -> bytes:
        """Nonce + ciphertext of the config, bound to ``channel_id``."""
        return bytes(self._box.encrypt(_encode(SealedConfig(channel_id=channel_id, config=config))))

    def open(self, channel_id: str, sealed: bytes, key_id: str) -> dict[str, str]:
        """The config sealed for ``channel_id``, or :class:`ConfigUnreadable`."""
        if key_id != self.key_id:
            raise ConfigUnreadable(f"sealed with another channel key ({key_id})")
        try:
            inner = _decode_sealed(self._box.decrypt(bytes(sealed)))
        except (nacl.exceptions.CryptoError, msgspec.DecodeError) as exc:
            raise ConfigUnreadable(f"does not open: {type(exc).__name__}") from None
        if inner.channel_id != channel_id:
            raise ConfigUnreadable("sealed for another channel")
        return inner.config


# -- helpers --------------------------------------------------------------------------------


def _channel(row: dict[str, Any], secret: str | None = None) -> c.ChannelResponse:
    return c.ChannelResponse(id=row["id"], team_id=row["team_id"], name=row["name"], provider=row["provider"],
                     events=list(row["events"]), created_at=rfc3339(row["created_at"]),
                     updated_at=rfc3339(row["updated_at"]), secret=secret)


def _team(actor: Principal, roles: tuple[str, ...]) -> str:
    """The actor's team if its role is one of ``roles``; 403 otherwise."""
    if not actor.team_id:
        raise NO_TEAM
    if actor.role not in roles:
        raise NEEDS_MANAGER if actor.role in MEMBERS else ServiceError(
            403, "forbidden", "you are not a member of this team")
    return actor.team_id


def check_name(name: str) -> str:
    """A channel name (1..100 printable characters, trimmed), or 400."""
    name = name.strip()
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise ServiceError(400, "invalid_request",
                           f"name must be 1 to {MAX_NAME} printable characters")
    return name


def check_events(events: list[str]) -> list[str]:
    """The subscribed event names (duplicates dropped, order kept), or 400 naming the bad one."""
    out: list[str] = []
    for i, name in enumerate(events):
        if name not in CHANNEL_EVENT_NAMES:
            raise ServiceError(400, "invalid_request",
                               f"events[{i}] {name!r} is not a channel event (one of: "
                               f"{', '.join(CHANNEL_EVENT_NAMES)})")
        if name not in out:
            out.append(name)
    return out


def check_config(provider: str, config: dict[str, str]) -> dict[str, str]:
    """:func:`providers.validate_config` with its refusal as a 400."""
    try:
        return providers.validate_config(provider, config)
    except InvalidConfig as exc:
        raise ServiceError(400, "invalid_request", exc.message) from None


def _taken(name: str) -> ServiceError:
    return ServiceError(409, "channel_name_taken", f"a channel named {name!r} already exists in this team")


class ChannelStore:
    """The teams' channels and the ``/v1/channels*`` handlers."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        config = ctx.config
        self.sealer = Sealer(load_channel_key(getattr(config, "channel_key", None), config.data_dir))
        self.settings = ProviderSettings(
            telegram_api_url=getattr(config, "telegram_api_url", ProviderSettings.telegram_api_url),
            allow_private_urls=bool(getattr(config, "channel_allow_private_urls", False)))
        self.max_per_team = int(getattr(config, "channel_max_per_team", 100))
        self.test_timeout_s = float(getattr(config, "channel_test_timeout_s", 10.0))

    def register(self) -> None:
        """Register the bus handlers."""
        self.ctx.handle(c.CreateChannel, self.create)
        self.ctx.handle(c.ListChannels, self.list)
        self.ctx.handle(c.GetChannel, self.get)
        self.ctx.handle(c.UpdateChannel, self.update)
        self.ctx.handle(c.DeleteChannel, self.delete)
        self.ctx.handle(c.RotateChannelConfig, self.rotate_config)
        self.ctx.handle(c.SendChannelTest, self.test)
        self.ctx.handle(c.ListDeliveryAttempts, self.list_attempts)

    @property
    def _db(self) -> Any:
        assert self.ctx.db is not None
        return self.ctx.db

    def open_config(self, channel_id: str, sealed: bytes, key_id: str) -> dict[str, str]:
        """The config of a channel from its row's ``config_sealed`` and ``key_id``."""
        return self.sealer.open(channel_id, sealed, key_id)

    # -- handlers ---------------------------------------------------------------------------

    async def create(self, msg: c.CreateChannel) -> c.ChannelReply:
        """Create a channel; the webhook secret is in this reply only."""
        team_id = _team(msg.actor, MANAGERS)
        name, events = check_name(msg.name), check_events(msg.events)
        config = check_config(msg.provider, msg.config)
        secret = None
        if msg.provider == "webhook":
            secret = config.setdefault("secret", providers.generate_secret())
        channel_id = "ch_" + secrets.token_hex(8)
        sealed = self.sealer.seal(channel_id, config)
        created_by = msg.actor.user_id or msg.actor.api_key_id

        def insert(conn: Any) -> dict[str, Any]:
            count = conn.execute("SELECT count(*) AS n FROM channels WHERE team_id = %s",
                                 (team_id,)).fetchone()["n"]
            if count >= self.max_per_team:
                raise ServiceError(409, "channel_limit",
                                   f"a team has at most {self.max_per_team} channels")
            row: dict[str, Any] = conn.execute(
                "INSERT INTO channels (id, team_id, name, provider, events, config_sealed, key_id,"
                f" created_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_CHANNEL_COLUMNS}",
                (channel_id, team_id, name, msg.provider, events, sealed, self.sealer.key_id,
                 created_by)).fetchone()
            return row

        try:
            row = await self._db.transaction(insert)
        except UniqueViolation:
            raise _taken(name) from None
        log.info("channel created", extra={"channel_id": channel_id, "team_id": team_id,
                                           "provider": msg.provider, "events": events})
        return c.ChannelReply(body=_channel(row, secret))

    async def list(self, msg: c.ListChannels) -> c.ChannelsReply:
        """The team's channels, oldest first."""
        team_id = _team(msg.actor, MEMBERS)
        rows = await self._db.fetchall(
            f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE team_id = %s ORDER BY created_at, id",
            (team_id,))
        return c.ChannelsReply(channels=[_channel(r) for r in rows])

    async def get(self, msg: c.GetChannel) -> c.ChannelReply:
        team_id = _team(msg.actor, MEMBERS)
        row = await self._db.fetchone(
            f"SELECT {_CHANNEL_COLUMNS} FROM channels WHERE id = %s AND team_id = %s",
            (msg.channel_id, team_id))
        if row is None:
            raise NOT_FOUND
        return c.ChannelReply(body=_channel(row))

    async def update(self, msg: c.UpdateChannel) -> c.ChannelReply:
        """Rename and re-subscribe."""
        team_id = _team(msg.actor, MANAGERS)
        name, events = check_name(msg.name), check_events(msg.events)
        try:
            row = await self._db.fetchone(
                "UPDATE channels SET name = %s, events = %s, updated_at = now()"
                f" WHERE id = %s AND team_id = %s RETURNING {_CHANNEL_COLUMNS}",
                (name, events, msg.channel_id, team_id))
        except UniqueViolation:
            raise _taken(name) from None
        if row is None:
            raise NOT_FOUND
        log.info("channel updated", extra={"channel_id": msg.channel_id, "events": events})
        return c.ChannelReply(body=_channel(row))

    async def delete(self, msg: c.DeleteChannel) -> c.ChannelDeleted:
        """Delete a channel and its deliveries."""
        team_id = _team(msg.actor, MANAGERS)
        count = await self._db.execute("DELETE FROM channels WHERE id = %s AND team_id = %s",
                                       (msg.channel_id, team_id))
        if not count:
            raise NOT_FOUND
        log.info("channel deleted", extra={"channel_id": msg.channel_id, "team_id": team_id})
        return c.ChannelDeleted()

    async def rotate_config(self, msg: c.RotateChannelConfig) -> c.ChannelReply:
        """Replace the config; a webhook secret generated here is answered once."""
        team_id = _team(msg.actor, MANAGERS)
        provider = await self._db.fetchval(
            "SELECT provider FROM channels WHERE id = %s AND team_id = %s", (msg.channel_id, team_id))
        if provider is None:
            raise NOT_FOUND
        config = check_config(provider, msg.config)
        secret = None
        if provider == "webhook" and "secret" not in config:
            secret = config["secret"] = providers.generate_secret()
        row = await self._db.fetchone(
            "UPDATE channels SET config_sealed = %s, key_id = %s, updated_at = now()"
            f" WHERE id = %s AND team_id = %s RETURNING {_CHANNEL_COLUMNS}",
            (self.sealer.seal(msg.channel_id, config), self.sealer.key_id, msg.channel_id, team_id))
        if row is None:
            raise NOT_FOUND
        log.info("channel config rotated", extra={"channel_id": msg.channel_id})
        return c.ChannelReply(body=_channel(row, secret))

    async def test(self, msg: c.SendChannelTest) -> c.ChannelTested:
        """Send :func:`providers.sample_event` to ``config`` (nothing saved); 400 with the reason."""
        _team(msg.actor, MANAGERS)
        config = check_config(msg.provider, msg.config)
        if msg.provider == "webhook":
            config.setdefault("secret", providers.generate_secret())
        request = providers.build_request(msg.provider, config, providers.sample_event(),
                                          key="test-" + secrets.token_hex(8), settings=self.settings)
        async with httpx.AsyncClient() as client:
            result = await providers.send(client, request, timeout_s=self.test_timeout_s, config=config,
                                          allow_private=self.settings.allow_private_urls)
        if not result.ok:
            raise ServiceError(400, "channel_test_failed", f"the test notification failed: {result.error}")
        return c.ChannelTested()

    async def list_attempts(self, msg: c.ListDeliveryAttempts) -> c.DeliveryAttempts:
        """Recorded attempts (bus only, for operators), oldest first."""
        limit = max(1, min(msg.limit, MAX_ATTEMPTS_LISTED))
        rows = await self._db.fetchall(
            "SELECT a.delivery_id, d.event_id, d.channel_id, a.attempt, a.status_code, a.latency_ms,"
            " a.error, a.created_at, d.status FROM delivery_attempts a"
            " JOIN deliveries d ON d.id = a.delivery_id"
            " WHERE (%(channel)s = '' OR d.channel_id = %(channel)s)"
            " AND (%(event)s = 0 OR d.event_id = %(event)s)"
            " ORDER BY a.id LIMIT %(limit)s",
            {"channel": msg.channel_id, "event": msg.event_id, "limit": limit})
        return c.DeliveryAttempts(attempts=[c.DeliveryAttempt(
            delivery_id=int(r["delivery_id"]), event_id=int(r["event_id"]), channel_id=r["channel_id"],
            attempt=int(r["attempt"]), status_code=r["status_code"], latency_ms=int(r["latency_ms"]),
            error=r["error"], at=rfc3339(r["created_at"]), delivery_status=r["status"]) for r in rows])

    async def delete_team(self, team_id: str) -> int:
        """Delete every channel of a deleted team; how many went."""
        if not team_id:
            return 0
        return int(await self._db.execute("DELETE FROM channels WHERE team_id = %s", (team_id,)))
