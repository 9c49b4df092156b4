"""The metrics service: per-capsule samples, team stats and usage, Prometheus exposition.

This is the service's process entry: ``dovecote metrics`` runs :data:`SPEC`.

Every vmmgr samples its running capsules (``vmmgr/sampler.py``) and hands
each closed 30-second average here (:class:`RecordSamples`). The service
keeps them (:mod:`.store`) and answers, for the gateway:

* :class:`QueryCapsuleMetrics`: a capsule's persisted points, for when its
  vmmgr's rings do not cover the range (paused across a vmmgr restart,
  stopped). 30-second averages serve the ``5m`` to ``2h`` ranges (the raw
  500 ms samples live only in vmmgr), 5-minute averages the longer ones;
* :class:`GetCapsuleStats`: a team's reserved capsules, vCPUs and memory
  per bucket of the range (the maximum in each), and 30-day peaks; the
  gateway brings ``current`` from vmmgr;
* :class:`GetCapsuleUsage`: reserved vCPU-minutes and RAM MB-minutes per
  UTC day.

A pruning task drops rows past their retention, and ``team.deleted`` drops a
team's rows at once. Like every service it also answers ``ScrapeMetrics``
(``libs/runtime.py``).
"""

from __future__ import annotations

import time
from datetime import date
from typing import Annotated, Any

import msgspec
import trio
from prometheus_client import Counter

from dovecote.bus.messages.auth_teams import TEAM_DELETED_TOPIC, TeamDeleted
from dovecote.bus.messages.metrics import (
    AGGREGATE_S,
    CAPSULE_RANGES,
    MAX_USAGE_DAYS,
    STATS_RANGES,
    CapsuleMetrics,
    CapsuleMetricsReply,
    CapsuleStats,
    CapsuleStatsReply,
    CapsuleUsageReply,
    GetCapsuleStats,
    GetCapsuleUsage,
    QueryCapsuleMetrics,
    RecordSamples,
    SamplesRecorded,
    StatsPeaks,
    UsageResponse,
)
from dovecote.libs.config import BaseConfig
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.runtime import ServiceContext, ServiceSpec
from dovecote.services.metrics import series
from dovecote.services.metrics.store import MetricsStore

log = get_logger("dovecote.metrics")

MAX_POINTS_PER_BATCH = 20_000
PEAK_WINDOW_S = 30 * 86400
Positive = Annotated[int, msgspec.Meta(ge=1)]

STORED = Counter("dovecote_metrics_points_stored", "Capsule 30 s averages stored.")
DUPLICATES = Counter("dovecote_metrics_points_duplicate", "Capsule 30 s averages received twice.")
PRUNED = Counter("dovecote_metrics_rows_pruned", "Rows deleted past their retention.", ["table"])


class MetricsConfig(BaseConfig, kw_only=True):
    """Settings of the metrics service (``DOVECOTE_*`` variables)."""

    metrics_points_retention_h: Positive = 48
    """Capsule points (``/v1/capsules/{id}/metrics`` of capsules vmmgr no longer holds)."""
    metrics_team_retention_d: Positive = 35
    """Team buckets (``/v1/capsules/stats``: the 30-day range and peaks)."""
    metrics_usage_retention_d: Positive = 400
    """Daily usage (``/v1/capsules/usage``)."""
    metrics_prune_every_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0


class MetricsHandlers:
    """The bus handlers of the metrics service."""

    def __init__(self, store: MetricsStore, *, clock: Any = time.time) -> None:
        self.store = store
        self.clock = clock

    def register(self, handle: Any) -> None:
        handle(RecordSamples, self.record)
        handle(QueryCapsuleMetrics, self.capsule_metrics)
        handle(GetCapsuleStats, self.stats)
        handle(GetCapsuleUsage, self.usage)

    async def record(self, msg: RecordSamples) -> SamplesRecorded:
        if len(msg.points) > MAX_POINTS_PER_BATCH:
            raise ServiceError(413, "too_large", f"at most {MAX_POINTS_PER_BATCH} points per batch")
        if not 0 < msg.interval_s <= AGGREGATE_S:
            raise ServiceError(400, "invalid_request", "interval_s must be in (0, 30]")
        for p in msg.points:
            if (p.samples <= 0 or p.vcpus < 0 or p.memory_mb < 0 or p.mem_bytes < 0 or p.disk_bytes < 0
                    or not 0 <= p.cpu_pct <= 100 or not p.capsule_id or not p.team_id):
                raise ServiceError(400, "invalid_request", f"invalid point of {p.capsule_id!r} at {p.ts}")
        accepted = await self.store.record(msg.host_id, msg.interval_s, msg.points)
        STORED.inc(accepted)
        DUPLICATES.inc(len(msg.points) - accepted)
        return SamplesRecorded(accepted=accepted, duplicates=len(msg.points) - accepted)

    async def capsule_metrics(self, msg: QueryCapsuleMetrics) -> CapsuleMetricsReply:
        if msg.range not in CAPSULE_RANGES:
            raise ServiceError(400, "invalid_request", "range must be one of " + ", ".join(CAPSULE_RANGES))
        if msg.admin and not msg.actor.is_admin:
            raise ServiceError(403, "forbidden", "platform admin access required")
        found, points = await self.store.capsule_points(msg.actor, msg.capsule_id, msg.range,
                                                        self.clock(), admin=msg.admin)
        return CapsuleMetricsReply(
            body=CapsuleMetrics(sandbox_id=msg.capsule_id, range=msg.range, points=points),
            available=found)

    async def stats(self, msg: GetCapsuleStats) -> CapsuleStatsReply:
        if msg.range not in STATS_RANGES:
            raise ServiceError(400, "invalid_request", "range must be one of " + ", ".join(STATS_RANGES))
        window, width = STATS_RANGES[msg.range]
        now = self.clock()
        starts = series.buckets(now, window, width)
        rows = await self.store.team_series(msg.actor.team_id, starts[0], width)
        running, vcpus, memory = await self.store.team_peaks(msg.actor.team_id, now - PEAK_WINDOW_S)
        current = msg.current
        peaks = StatsPeaks(running_count=max(running, current.running_count),
                           vcpus=max(vcpus, current.vcpus_reserved),
                           memory_mb=max(memory, current.memory_mb_reserved))
        return CapsuleStatsReply(body=CapsuleStats(range=msg.range, current=current, peaks=peaks,
                                                   series=series.fill_series(rows, starts)))

    async def usage(self, msg: GetCapsuleUsage) -> CapsuleUsageReply:
        try:
            first, last = date.fromisoformat(msg.from_date), date.fromisoformat(msg.to_date)
        except ValueError:
            raise ServiceError(400, "invalid_request", "from and to must be YYYY-MM-DD") from None
        if first > last or (last - first).days > MAX_USAGE_DAYS:
            raise ServiceError(400, "invalid_request",
                               f"from must not be after to, and the range at most {MAX_USAGE_DAYS} days")
        rows = await self.store.team_usage(msg.actor.team_id, first, last)
        today = time.gmtime(self.clock())
        points = series.fill_usage(rows, first, last, date(today.tm_year, today.tm_mon, today.tm_mday))
        return CapsuleUsageReply(body=UsageResponse(from_=msg.from_date, to=msg.to_date, points=points))


async def main(ctx: ServiceContext[MetricsConfig], *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer the metrics messages; prune old rows; forget deleted teams."""
    assert ctx.db is not None
    store = MetricsStore(ctx.db)
    MetricsHandlers(store).register(ctx.handle)
    ctx.nursery.start_soon(_prune_loop, store, ctx.config)
    await ctx.nursery.start(_forget_deleted_teams, ctx, store)
    task_status.started()
    await ctx.stopping.wait()


async def _prune_loop(store: MetricsStore, config: MetricsConfig) -> None:
    while True:
        try:
            deleted = await store.prune(points_hours=config.metrics_points_retention_h,
                                        team_days=config.metrics_team_retention_d,
                                        usage_days=config.metrics_usage_retention_d)
            for table, count in deleted.items():
                PRUNED.labels(table).inc(max(0, count))
        except Exception:
            log.warning("could not prune old metrics", exc_info=True)
        await trio.sleep(config.metrics_prune_every_s)


async def _forget_deleted_teams(ctx: ServiceContext[MetricsConfig], store: MetricsStore, *,
                                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with ctx.bus.subscribe(TEAM_DELETED_TOPIC) as events:
        task_status.started()
        async for _topic, event in events:
            if isinstance(event, TeamDeleted):
                try:
                    await store.forget_team(event.team_id)
                except Exception:
                    log.warning("could not drop a deleted team's metrics", exc_info=True,
                                extra={"team_id": event.team_id})


SPEC: ServiceSpec[MetricsConfig] = ServiceSpec(
    name="metrics",
    config_cls=MetricsConfig,
    main=main,
    schema="metrics",
    migrations="dovecote.services.metrics:migrations",
)
