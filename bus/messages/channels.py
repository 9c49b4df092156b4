"""Messages of notification channels (bus name ``notifier``).

The notifier owns the channels of every team. The gateway forwards each
``/v1/channels*`` request as one message carrying the caller
(:class:`~dovecote.bus.messages.common.Principal`); replies carry the
reference's ``ChannelResponse`` (:class:`ChannelResponse`), and refusals are a
:class:`~dovecote.bus.messages.common.Failure` (400 naming the bad field,
403 ``insufficient_role``, 404 for a channel of another team, 409
``channel_name_taken``).

A channel's ``config`` (webhook URLs, bot tokens, the webhook secret) is
write-only: it travels in :class:`CreateChannel`, :class:`RotateChannelConfig`
and :class:`SendChannelTest`, never in a reply. The one exception is the
generic webhook's signing ``secret``, answered in ``ChannelResponse.secret`` by the
creation (and by a rotation that had the notifier generate a new one).

Bus only, for operators: :class:`ListDeliveryAttempts` answers the recorded
delivery attempts (:class:`DeliveryAttempt`) of one channel or event.
"""

from __future__ import annotations

import msgspec

from .base import Family, Message
from .common import Principal

# -- response bodies (the reference's schemas) ---------------------------------


class ChannelResponse(msgspec.Struct, kw_only=True):
    """The reference's ``ChannelResponse``; ``secret`` is null except right after creation."""

    id: str
    team_id: str
    name: str
    provider: str
    events: list[str]
    created_at: str
    updated_at: str
    secret: str | None = None


class ChannelTestResult(msgspec.Struct, kw_only=True):
    """Body of a successful ``POST /v1/channels/test``."""

    status: str = "ok"


# -- the channels API ----------------------------------------------------------------


class CreateChannel(Message, tag="channels.create", kw_only=True):
    actor: Principal
    name: str
    provider: str
    config: dict[str, str]
    events: list[str]


class ListChannels(Message, tag="channels.list", kw_only=True):
    actor: Principal


class GetChannel(Message, tag="channels.get", kw_only=True):
    actor: Principal
    channel_id: str


class UpdateChannel(Message, tag="channels.update", kw_only=True):
    """Rename and re-subscribe (the provider and config stay)."""

    actor: Principal
    channel_id: str
    name: str
    events: list[str]


class DeleteChannel(Message, tag="channels.delete", kw_only=True):
    """Answers :class:`ChannelDeleted`; the channel's pending deliveries go with it."""

    actor: Principal
    channel_id: str


class RotateChannelConfig(Message, tag="channels.rotate_config", kw_only=True):
    """Replace the whole config (all of the provider's required fields)."""

    actor: Principal
    channel_id: str
    config: dict[str, str]


class SendChannelTest(Message, tag="channels.test", kw_only=True):
    """Send a test notification to ``config`` without saving anything.

    Answers :class:`ChannelTested`, or a 400 ``channel_test_failed`` Failure
    whose message says what the receiver answered (or why it was unreachable).
    """

    actor: Principal
    provider: str
    config: dict[str, str]


class ChannelReply(Message, tag="channels.channel_reply", kw_only=True):
    """Answer of create (HTTP 201), get, update and rotate (200)."""

    body: ChannelResponse


class ChannelsReply(Message, tag="channels.list_reply", kw_only=True):
    channels: list[ChannelResponse]


class ChannelDeleted(Message, tag="channels.deleted", kw_only=True):
    """Answer of :class:`DeleteChannel` (HTTP 204)."""


class ChannelTested(Message, tag="channels.tested", kw_only=True):
    body: ChannelTestResult = msgspec.field(default_factory=ChannelTestResult)


# -- bus only: delivery records ----------------------------------------------------


class DeliveryAttempt(msgspec.Struct, kw_only=True):
    """One HTTP attempt of one delivery (a row of ``notifier.delivery_attempts``).

    ``status_code`` is None when no HTTP answer came (connection error,
    timeout); ``error`` is None for a delivered attempt; ``delivery_status``
    is the delivery's status now (``pending``, ``delivered``, ``failed``).
    """

    delivery_id: int
    event_id: int
    channel_id: str
    attempt: int
    status_code: int | None = None
    latency_ms: int
    error: str | None = None
    at: str
    delivery_status: str


class ListDeliveryAttempts(Message, tag="channels.list_attempts", kw_only=True):
    """Attempts of one channel (``channel_id``) and/or one event (``event_id``), oldest first."""

    channel_id: str = ""
    event_id: int = 0
    limit: int = 200


class DeliveryAttempts(Message, tag="channels.attempts", kw_only=True):
    attempts: list[DeliveryAttempt]


FAMILY = Family("channels", __name__)
"""The channels messages and their one Decoder (define every message above this line)."""
