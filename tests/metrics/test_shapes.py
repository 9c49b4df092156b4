"""Pure helpers: stats buckets, usage days, /metrics access and merging, usage dates."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dovecote.bus.messages.metrics import STATS_RANGES, CapsulePoint, Exposition, MetricFamily, MetricSample
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routes.metrics import (
    MetricsAccess,
    merge_families,
    render,
    scrape_refusal,
    usage_dates,
)
from dovecote.services.metrics import series


def point(team: str, ts: int, *, samples: int = 60, vcpus: int = 2, memory_mb: int = 512,
          capsule: str = "cap-1") -> CapsulePoint:
    return CapsulePoint(capsule_id=capsule, team_id=team, ts=ts, samples=samples, cpu_pct=10.0,
                        mem_bytes=1, disk_bytes=1, vcpus=vcpus, memory_mb=memory_mb)


@pytest.mark.parametrize(("name", "count"), [("5m", 10), ("1h", 120), ("6h", 120), ("24h", 120),
                                             ("30d", 120)])
def test_every_stats_range_has_a_fixed_number_of_aligned_buckets(name: str, count: int) -> None:
    window, width = STATS_RANGES[name]
    now = 1_700_000_123.4
    starts = series.buckets(now, window, width)
    assert len(starts) == count
    assert all(s % width == 0 for s in starts)
    assert starts[-1] <= now < starts[-1] + width
    assert starts == sorted(starts) and starts[1] - starts[0] == width


def test_series_fill_gaps_with_zeros() -> None:
    starts = [0, 30, 60]
    filled = series.fill_series({30: (2, 3, 1024)}, starts)
    assert filled.labels == ["1970-01-01T00:00:00Z", "1970-01-01T00:00:30Z", "1970-01-01T00:01:00Z"]
    assert filled.running == [0, 2, 0] and filled.vcpus == [0, 3, 0] and filled.memory_mb == [0, 1024, 0]


def test_team_totals_count_capsules_per_bucket() -> None:
    totals = series.team_totals([point("a", 30), point("a", 30, capsule="cap-2", vcpus=1),
                                 point("b", 30), point("a", 60)])
    assert totals == {("a", 30): (2, 3, 1024), ("b", 30): (1, 2, 512), ("a", 60): (1, 2, 512)}


def test_usage_is_reserved_resources_times_the_time_sampled() -> None:
    day = int(datetime(2024, 5, 1, tzinfo=UTC).timestamp())
    totals = series.usage_totals([
        point("a", day, samples=60),  # a full bucket: 0.5 min
        point("a", day + 30, samples=20),  # 10 s of a bucket
        point("a", day - 30, samples=60),  # the day before
        point("a", day + 60, samples=600),  # never more than a bucket
    ], 0.5)
    minutes = 0.5 + 1 / 6 + 0.5
    assert totals[("a", date(2024, 5, 1))] == pytest.approx((2 * minutes, 512 * minutes))
    assert totals[("a", date(2024, 4, 30))] == pytest.approx((1.0, 256.0))


def test_usage_has_a_point_per_day_up_to_today() -> None:
    points = series.fill_usage({date(2024, 5, 2): (3.0, 100.0)}, date(2024, 5, 1), date(2024, 5, 9),
                               today=date(2024, 5, 3))
    assert [(p.date, p.cpu_minutes, p.ram_mb_minutes) for p in points] == [
        ("2024-05-01", 0.0, 0.0), ("2024-05-02", 3.0, 100.0), ("2024-05-03", 0.0, 0.0)]


def test_usage_dates_default_to_the_last_30_days() -> None:
    today = datetime(2024, 5, 31, 23, 0, tzinfo=UTC)
    assert usage_dates(None, None, today) == ("2024-05-02", "2024-05-31")
    assert usage_dates("2024-01-01", "2024-01-01", today) == ("2024-01-01", "2024-01-01")
    assert usage_dates(None, "2024-03-01", today) == ("2024-02-01", "2024-03-01")


@pytest.mark.parametrize(("raw_from", "raw_to"), [
    ("2024-5-1", None), ("yesterday", None), (None, "2024-02-30"), ("2024-05-02", "2024-05-01"),
    ("2024-01-01", "2024-05-01")])
def test_bad_usage_dates_are_400(raw_from: str | None, raw_to: str | None) -> None:
    with pytest.raises(ApiError) as caught:
        usage_dates(raw_from, raw_to, datetime(2024, 5, 31, tzinfo=UTC))
    assert caught.value.status == 400 and caught.value.code == "invalid_request"


def test_metrics_are_served_to_loopback_and_to_the_token() -> None:
    open_ = MetricsAccess()
    assert scrape_refusal("127.0.0.1", "", open_) is None
    assert scrape_refusal("::1", "", open_) is None
    refused = scrape_refusal("10.0.0.5", "", open_)
    assert refused is not None and refused.status == 403
    token = MetricsAccess(metrics_token="s3cret")
    assert scrape_refusal("10.0.0.5", "Bearer s3cret", token) is None
    assert scrape_refusal("10.0.0.5", "bearer s3cret", token) is None
    for header in ("", "Bearer nope", "Basic s3cret"):
        refused = scrape_refusal("10.0.0.5", header, token)
        assert refused is not None and refused.status == 401
    behind_proxy = MetricsAccess(metrics_token="s3cret", metrics_allow_loopback=False)
    refused = scrape_refusal("127.0.0.1", "", behind_proxy)
    assert refused is not None and refused.status == 401
    assert scrape_refusal(None, "", open_) is not None


def test_families_of_several_services_merge_into_valid_exposition() -> None:
    def counter(value: float, **labels: str) -> MetricFamily:
        return MetricFamily(name="dovecote_bus_requests", type="counter", help="Bus requests.",
                            samples=[MetricSample("dovecote_bus_requests_total", labels, value)])

    answers = [
        Exposition(service="auth", host_id="local", families=[
            counter(3, service="auth", message="auth.login", outcome="ok"),
            MetricFamily(name="process_cpu_seconds", type="counter", help="CPU.",
                         samples=[MetricSample("process_cpu_seconds_total", {}, 1.5)])]),
        Exposition(service="vmmgr", host_id="h1", families=[
            counter(5, service="vmmgr", message="capsules.list", outcome="ok"),
            MetricFamily(name="process_cpu_seconds", type="counter", help="CPU.",
                         samples=[MetricSample("process_cpu_seconds_total", {}, 2.5)]),
            MetricFamily(name="process_cpu_seconds", type="gauge", help="conflicting type",
                         samples=[MetricSample("process_cpu_seconds", {}, 9.0)])]),
    ]
    text = render(merge_families(answers)).decode()
    assert text.count("# TYPE dovecote_bus_requests_total counter") == 1
    assert text.count("# TYPE process_cpu_seconds_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    cpu = {s.labels["service"]: (s.labels["host"], s.value) for s in families["process_cpu_seconds"].samples}
    assert cpu == {"auth": ("local", 1.5), "vmmgr": ("h1", 2.5)}
    requests = {s.labels["service"]: s.value for s in families["dovecote_bus_requests"].samples}
    assert requests == {"auth": 3.0, "vmmgr": 5.0}
