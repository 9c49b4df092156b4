"""The notifier service: the lifecycle event log, notification channels and their deliveries.

This is the service's process entry: ``dovecote notifier`` runs :data:`SPEC`.

* :mod:`.eventlog` keeps the durable event log (``RecordEvent``/``ListEvents``,
  retention) and publishes each appended event on the event plane;
* :mod:`.channels` stores the teams' channels (secrets sealed with pynacl) and
  answers the ``/v1/channels*`` messages;
* :mod:`.delivery` delivers each event to the subscribed channels, at least
  once, with retries, recording every attempt. Its queue is filled in the
  same transaction that appends the event, so a restart loses nothing.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import trio

from dovecote.libs.config import BaseConfig
from dovecote.libs.runtime import ServiceContext, ServiceSpec

from .channels import ChannelStore
from .delivery import Deliverer
from .eventlog import EventLog


class NotifierConfig(BaseConfig, kw_only=True):
    """Settings of the notifier service (``DOVECOTE_*`` variables)."""

    event_retention_s: float = 7 * 24 * 3600.0
    """How long the event log keeps an event."""
    channel_key: str | None = None
    """Base64 of the 32-byte SecretBox key sealing channel configs (else ``<data_dir>/channel.key``)."""
    channel_max_per_team: Annotated[int, msgspec.Meta(ge=1)] = 100
    channel_test_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """Deadline of ``POST /v1/channels/test`` (the whole request to the receiver)."""
    channel_allow_private_urls: bool = False
    """Let channels reach loopback, private and link-local addresses (off: any team owner could
    make the notifier probe the platform's own network)."""
    telegram_api_url: Annotated[str, msgspec.Meta(pattern=r"^https?://")] = "https://api.telegram.org"
    """Base URL of the Telegram Bot API."""
    delivery_max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 8
    delivery_backoff_base_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    delivery_backoff_max_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    delivery_max_retry_after_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    """The longest provider-requested wait (``Retry-After``) honoured."""
    delivery_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """Deadline of one delivery request (connect, send, answer)."""
    delivery_lease_margin_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """A claimed delivery comes back after timeout + this margin if its attempt was never recorded."""
    delivery_concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    delivery_poll_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """Longest sleep of the delivery loop (it also wakes on each appended event)."""


async def main(ctx: ServiceContext[NotifierConfig], *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Register the handlers, start the event log and the deliverer, run until stopped."""
    channels = ChannelStore(ctx)
    deliverer = Deliverer(ctx, channels)
    eventlog = EventLog(ctx, on_append=deliverer.enqueue)
    channels.register()
    eventlog.register()
    async with trio.open_nursery() as nursery:
        await nursery.start(eventlog.run)
        await nursery.start(deliverer.run)
        task_status.started()
        await ctx.stopping.wait()
        nursery.cancel_scope.cancel()


SPEC: ServiceSpec[NotifierConfig] = ServiceSpec(
    name="notifier",
    config_cls=NotifierConfig,
    main=main,
    schema="notifier",
    migrations="dovecote.notifier:migrations",
)
