"""The metrics service's handlers on a real PostgreSQL schema (no bus)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dovecote.bus.messages.common import Principal
from dovecote.bus.messages.metrics import (
    CapsulePoint,
    GetCapsuleStats,
    GetCapsuleUsage,
    QueryCapsuleMetrics,
    RecordSamples,
    StatsCurrent,
)
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from dovecote.services.metrics.service import MetricsHandlers
from dovecote.services.metrics.store import MetricsStore

NOW = datetime(2024, 5, 10, 12, 0, 5, tzinfo=UTC).timestamp()
BUCKET = int(NOW // 30) * 30  # the bucket NOW is in (still open on a vmmgr)


def pt(capsule: str, team: str, ts: int, *, cpu: float = 10.0, samples: int = 60, vcpus: int = 2,
       memory_mb: int = 512, mem: int = 1 << 20) -> CapsulePoint:
    return CapsulePoint(capsule_id=capsule, team_id=team, ts=ts, samples=samples, cpu_pct=cpu,
                        mem_bytes=mem, disk_bytes=4096, vcpus=vcpus, memory_mb=memory_mb)


def who(team: str, *, admin: bool = False) -> Principal:
    return Principal(auth_type="session", user_id="u-" + team, team_id=team, is_admin=admin)


@pytest.fixture
def handlers(metrics_db: Database) -> MetricsHandlers:
    return MetricsHandlers(MetricsStore(metrics_db), clock=lambda: NOW)


async def test_a_batch_sent_twice_counts_once(handlers: MetricsHandlers, metrics_db: Database) -> None:
    batch = RecordSamples(host_id="h1", points=[
        pt("cap-a", "t1", BUCKET - 60), pt("cap-a", "t1", BUCKET - 30),
        pt("cap-b", "t1", BUCKET - 30, vcpus=1, memory_mb=256)])
    first = await handlers.record(batch)
    assert (first.accepted, first.duplicates) == (3, 0)
    again = await handlers.record(batch)
    assert (again.accepted, again.duplicates) == (0, 3)
    rows = await metrics_db.fetchall(
        "SELECT extract(epoch FROM ts)::bigint AS ts, running_count, vcpus, memory_mb FROM team_points "
        "WHERE team_id = 't1' ORDER BY ts")
    assert [(r["ts"], r["running_count"], r["vcpus"], r["memory_mb"]) for r in rows] == [
        (BUCKET - 60, 1, 2, 512), (BUCKET - 30, 2, 3, 768)]
    usage = await metrics_db.fetchone(
        "SELECT cpu_minutes, ram_mb_minutes FROM daily_usage WHERE team_id = 't1'")
    assert usage is not None
    assert usage["cpu_minutes"] == pytest.approx(2 * 0.5 + 2 * 0.5 + 1 * 0.5)
    assert usage["ram_mb_minutes"] == pytest.approx(512 * 0.5 * 2 + 256 * 0.5)


async def test_bad_points_are_refused(handlers: MetricsHandlers) -> None:
    for bad in (pt("cap-a", "t1", BUCKET, cpu=101.0), pt("cap-a", "", BUCKET),
                pt("cap-a", "t1", BUCKET, samples=0)):
        with pytest.raises(ServiceError) as caught:
            await handlers.record(RecordSamples(host_id="h1", points=[bad]))
        assert caught.value.status == 400
    with pytest.raises(ServiceError):
        await handlers.record(RecordSamples(host_id="h1", interval_s=0, points=[]))


async def test_a_capsules_history_is_its_teams_only(handlers: MetricsHandlers) -> None:
    await handlers.record(RecordSamples(host_id="h1", points=[
        pt("cap-a", "t1", BUCKET - 30 * i, cpu=float(i), mem=1000 * i) for i in range(1, 30)]))
    reply = await handlers.capsule_metrics(QueryCapsuleMetrics(actor=who("t1"), capsule_id="cap-a",
                                                               range="10m"))
    assert reply.available
    # The raw tier is not persisted: 30 s averages of the last 10 minutes (and the bucket across its start).
    assert [p.timestamp_unix for p in reply.body.points] == [BUCKET - 30 * i for i in range(20, 0, -1)]
    assert reply.body.points[-1].cpu_pct == 1.0 and reply.body.points[-1].mem_bytes == 1000
    hour = await handlers.capsule_metrics(QueryCapsuleMetrics(actor=who("t1"), capsule_id="cap-a",
                                                              range="1h"))
    assert len(hour.body.points) == 29
    day = await handlers.capsule_metrics(QueryCapsuleMetrics(actor=who("t1"), capsule_id="cap-a",
                                                             range="24h"))
    assert [p.timestamp_unix % 300 for p in day.body.points] == [0] * len(day.body.points)
    assert sum(1 for _ in day.body.points) in (3, 4)  # 29 buckets of 30 s span 3 or 4 five-minute buckets
    other = await handlers.capsule_metrics(QueryCapsuleMetrics(actor=who("t2"), capsule_id="cap-a"))
    assert not other.available and other.body.points == []
    admin = await handlers.capsule_metrics(QueryCapsuleMetrics(
        actor=who("t2", admin=True), capsule_id="cap-a", admin=True))
    assert admin.available and admin.body.points
    with pytest.raises(ServiceError) as caught:
        await handlers.capsule_metrics(QueryCapsuleMetrics(actor=who("t2"), capsule_id="cap-a", admin=True))
    assert caught.value.status == 403
    with pytest.raises(ServiceError) as caught:
        await handlers.capsule_metrics(QueryCapsuleMetrics(actor=who("t1"), capsule_id="cap-a",
                                                           range="3d"))
    assert caught.value.status == 400


async def test_five_minute_averages_weight_by_samples(handlers: MetricsHandlers) -> None:
    start = BUCKET - BUCKET % 300 - 300
    await handlers.record(RecordSamples(host_id="h1", points=[
        pt("cap-a", "t1", start, cpu=90.0, samples=20), pt("cap-a", "t1", start + 30, cpu=10.0, samples=60)]))
    reply = await handlers.capsule_metrics(QueryCapsuleMetrics(actor=who("t1"), capsule_id="cap-a",
                                                               range="6h"))
    (point,) = reply.body.points
    assert point.timestamp_unix == start and point.cpu_pct == pytest.approx((90 * 20 + 10 * 60) / 80)


async def test_stats_are_per_team_with_fixed_buckets(handlers: MetricsHandlers) -> None:
    await handlers.record(RecordSamples(host_id="h1", points=[
        pt("cap-a", "t1", BUCKET - 60), pt("cap-b", "t1", BUCKET - 60, vcpus=4, memory_mb=1024),
        pt("cap-a", "t1", BUCKET - 30)]))
    await handlers.record(RecordSamples(host_id="h2", points=[pt("cap-c", "t1", BUCKET - 30)]))
    current = StatsCurrent(running_count=1, vcpus_reserved=2, memory_mb_reserved=512, sampled_at="now")
    reply = await handlers.stats(GetCapsuleStats(actor=who("t1"), range="5m", current=current))
    body = reply.body
    assert body.range == "5m" and body.current == current
    assert len(body.series.labels) == 10 and body.series.labels[-1].endswith("Z")
    assert body.series.running[-3:] == [2, 2, 0]
    assert body.series.vcpus[-3:] == [6, 4, 0] and body.series.memory_mb[-3:] == [1536, 1024, 0]
    assert (body.peaks.running_count, body.peaks.vcpus, body.peaks.memory_mb) == (2, 6, 1536)
    month = (await handlers.stats(GetCapsuleStats(actor=who("t1"), range="30d"))).body
    assert len(month.series.labels) == 120 and max(month.series.vcpus) == 6
    other = (await handlers.stats(GetCapsuleStats(actor=who("t2"), range="1h"))).body
    assert len(other.series.labels) == 120 and set(other.series.running) == {0}
    assert (other.peaks.running_count, other.peaks.vcpus, other.peaks.memory_mb) == (0, 0, 0)
    with pytest.raises(ServiceError):
        await handlers.stats(GetCapsuleStats(actor=who("t1"), range="10m"))


async def test_usage_is_per_team_and_day(handlers: MetricsHandlers) -> None:
    yesterday = BUCKET - 86400
    await handlers.record(RecordSamples(host_id="h1", points=[
        pt("cap-a", "t1", BUCKET - 30), pt("cap-a", "t1", yesterday, vcpus=2, memory_mb=1024, samples=30)]))
    reply = await handlers.usage(GetCapsuleUsage(actor=who("t1"), from_date="2024-05-08",
                                                 to_date="2024-05-31"))
    body = reply.body
    assert (body.from_, body.to) == ("2024-05-08", "2024-05-31")
    assert [(p.date, p.cpu_minutes, p.ram_mb_minutes) for p in body.points] == [
        ("2024-05-08", 0.0, 0.0), ("2024-05-09", 0.5, 256.0), ("2024-05-10", 1.0, 256.0)]  # up to today
    other = (await handlers.usage(GetCapsuleUsage(actor=who("t2"), from_date="2024-05-09",
                                                  to_date="2024-05-10"))).body
    assert [(p.cpu_minutes, p.ram_mb_minutes) for p in other.points] == [(0.0, 0.0), (0.0, 0.0)]


async def test_prune_and_team_deletion(handlers: MetricsHandlers, metrics_db: Database) -> None:
    now = int(datetime.now(UTC).timestamp()) // 30 * 30
    await handlers.record(RecordSamples(host_id="h1", points=[
        pt("cap-a", "t1", now - 30), pt("cap-a", "t1", now - 3 * 86400), pt("cap-b", "t2", now - 30)]))
    store = handlers.store
    deleted = await store.prune(points_hours=48, team_days=2, usage_days=400)
    assert deleted == {"capsule_points": 1, "team_points": 1, "daily_usage": 0}
    await store.forget_team("t1")
    for table in ("capsule_points", "team_points", "daily_usage"):
        assert await metrics_db.fetchval(f"SELECT count(*) FROM {table} WHERE team_id = 't1'") == 0
        assert await metrics_db.fetchval(f"SELECT count(*) FROM {table} WHERE team_id = 't2'") == 1
