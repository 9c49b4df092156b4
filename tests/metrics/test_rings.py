"""vmmgr's rings and tiers, fed synthetic samples with synthetic timestamps (no I/O)."""

from __future__ import annotations

import pytest

from dovecote.vmmgr.sampler import Point, Rings, Tier, cpu_percent

T0 = 1_700_000_110.0  # 10 s into a 30 s bucket (T0 - 10 is a multiple of 30 and of 300)


def sample(ts: float, cpu: float = 50.0, mem: int = 1000, disk: int = 10) -> Point:
    return Point(ts=ts, cpu_pct=cpu, mem_bytes=mem, disk_bytes=disk)


def feed(rings: Rings, start: float, seconds: float, **kw: float) -> list[Point]:
    """Samples every 0.5 s from ``start`` for ``seconds``; returns the 30 s averages closed."""
    closed = []
    for i in range(int(seconds * 2)):
        point = rings.add(sample(start + i * 0.5, **kw))  # type: ignore[arg-type]
        if point is not None:
            closed.append(point)
    return closed


def test_bucket_starts_are_aligned_to_the_width() -> None:
    assert (T0 - 10) % 300 == 0
    tier = Tier(30, 7200)
    assert tier.add(sample(T0)) is None
    closed = tier.add(sample(T0 + 25))  # next bucket starts at T0 + 20
    assert closed is not None and closed.ts == T0 - 10 and closed.samples == 1


def test_30s_averages_weight_every_sample_of_the_bucket() -> None:
    rings = Rings(began=T0)
    # 20 s at 10 % then 10 s at 40 %: the first bucket (T0-10 .. T0+20) holds 40 samples at 10 %.
    closed = feed(rings, T0, 20, cpu=10.0, mem=1000)
    closed += feed(rings, T0 + 20, 30, cpu=40.0, mem=3000)
    closed += feed(rings, T0 + 50, 1, cpu=0.0)  # opens the third bucket: closes the second
    assert [p.ts for p in closed] == [T0 - 10, T0 + 20]
    first, second = closed
    assert first.samples == 40 and first.cpu_pct == pytest.approx(10.0) and first.mem_bytes == 1000
    assert second.samples == 60 and second.cpu_pct == pytest.approx(40.0) and second.mem_bytes == 3000
    assert list(rings.mid.points) == closed


def test_a_mixed_bucket_averages_its_samples() -> None:
    tier = Tier(30, 7200)
    start = T0 - 10
    for i in range(60):
        tier.add(sample(start + i * 0.5, cpu=100.0 if i < 15 else 0.0, mem=4000 if i < 30 else 2000))
    closed = tier.flush(start + 30)
    assert closed is not None and closed.samples == 60
    assert closed.cpu_pct == pytest.approx(25.0)
    assert closed.mem_bytes == 3000


def test_5min_averages_come_from_the_raw_samples() -> None:
    rings = Rings(began=T0)
    start = T0 - 10  # a 5 min boundary
    feed(rings, start, 300, cpu=20.0)  # the whole first 5 min bucket
    feed(rings, start + 300, 60, cpu=80.0)  # one minute into the second
    assert [(p.ts, p.samples) for p in rings.long.points] == [(start, 600)]
    assert rings.long.points[0].cpu_pct == pytest.approx(20.0)
    # The second bucket closes once its end has passed, without a new sample (a paused capsule).
    rings.flush(start + 599)
    assert len(rings.long.points) == 1
    rings.flush(start + 600)
    assert [(p.ts, p.samples) for p in rings.long.points][-1] == (start + 300, 120)
    assert rings.long.points[-1].cpu_pct == pytest.approx(80.0)


def test_a_paused_capsules_last_bucket_closes_once_its_end_passed() -> None:
    rings = Rings(began=T0)
    assert feed(rings, T0, 10) == []  # 20 samples, then the capsule stops being sampled
    assert rings.flush(T0 + 19) is None  # the bucket ends at T0 + 20
    closed = rings.flush(T0 + 20)
    assert closed is not None and closed.ts == T0 - 10 and closed.samples == 20
    assert rings.flush(T0 + 200) is None  # closed once


def test_force_flush_hands_over_the_open_bucket() -> None:
    rings = Rings(began=T0)
    feed(rings, T0, 5)
    closed = rings.flush(T0 + 5, force=True)
    assert closed is not None and closed.samples == 10


def test_raw_ring_keeps_ten_minutes() -> None:
    rings = Rings(began=T0)
    feed(rings, T0, 700)
    newest = T0 + 699.5
    assert len(rings.raw) == 1200
    assert rings.raw[0].ts > newest - 600 and rings.raw[-1].ts == newest
    # Nothing newer arrives (paused): time alone evicts.
    rings.flush(newest + 300)
    assert len(rings.raw) == 600
    rings.flush(newest + 601)
    assert len(rings.raw) == 0


def test_30s_tier_keeps_two_hours() -> None:
    tier = Tier(30, 7200)
    start = T0 - 10
    for i in range(3 * 120):  # three hours of full buckets
        tier.add(Point(ts=start + i * 30, cpu_pct=float(i % 100), mem_bytes=i, disk_bytes=0, samples=60))
    now = start + 3 * 3600
    tier.flush(now)
    assert len(tier.points) == 240
    assert tier.points[0].ts + 30 > now - 7200 and tier.points[-1].ts == now - 30


def test_5min_tier_keeps_a_day() -> None:
    tier = Tier(300, 86400)
    start = T0 - 10
    for i in range(25 * 120):  # 25 hours of 30 s averages
        tier.add(Point(ts=start + i * 30, cpu_pct=50.0, mem_bytes=1, disk_bytes=1, samples=60))
    now = start + 25 * 3600
    tier.flush(now)
    assert len(tier.points) == 288
    assert all(p.samples == 600 for p in tier.points)
    assert tier.points[0].ts == now - 86400 and tier.points[-1].ts == now - 300


def test_a_clock_step_back_is_dropped() -> None:
    tier = Tier(30, 7200)
    tier.add(sample(T0 + 30))
    assert tier.add(sample(T0 - 40)) is None
    closed = tier.flush(T0 + 100)
    assert closed is not None and closed.samples == 1


def test_points_of_a_range_come_from_the_right_tier() -> None:
    rings = Rings(began=T0)
    feed(rings, T0 - 10, 3 * 3600)
    now = T0 - 10 + 3 * 3600  # the next sample would be now: every bucket before it is closed
    rings.flush(now)
    raw = rings.points(300, 0, now)
    assert len(raw) == 599 and all(p.samples == 1 for p in raw)  # (now - 300, now)
    assert len(rings.points(600, 0, now)) == 1199
    mid = rings.points(3600, 30, now)
    assert len(mid) == 120 and all(p.samples == 60 for p in mid)
    assert len(rings.points(7200, 30, now)) == 240
    long = rings.points(86400, 300, now)
    assert len(long) == 36 and all(p.samples == 600 for p in long)


def test_rings_cover_a_window_only_if_they_saw_all_of_it() -> None:
    rings = Rings(began=T0)
    now = T0 + 1200
    assert rings.covers(600, now, started_at=None)
    assert not rings.covers(3600, now, started_at=None)  # vmmgr restarted 20 minutes ago
    assert rings.covers(3600, now, started_at=T0 - 5)  # the capsule started just before
    assert not rings.covers(3600, now, started_at=T0 - 600)


def test_cpu_percent_is_normalised_to_vcpus() -> None:
    second = 1_000_000_000
    assert cpu_percent(None, (1.0, second), 1) is None
    assert cpu_percent((0.0, 0), (0.5, second // 2), 1) == pytest.approx(100.0)
    assert cpu_percent((0.0, 0), (0.5, second // 4), 1) == pytest.approx(50.0)
    assert cpu_percent((0.0, 0), (0.5, second // 2), 4) == pytest.approx(25.0)
    assert cpu_percent((0.0, 0), (0.5, 10 * second), 1) == 100.0  # clamped
    assert cpu_percent((1.0, 5), (1.0, 9), 1) is None  # no time passed
    assert cpu_percent((0.0, 5 * second), (0.5, 0), 1) is None  # restored VM: counter restarted
