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
