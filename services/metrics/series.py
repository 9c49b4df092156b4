"""Shapes of the stats and usage answers, without I/O.

The charts of ``/v1/capsules/stats`` get one value per bucket of the range,
zeros where nothing ran, so every range has a fixed number of points
(``window / width``: 10 for ``5m``, 120 for the others). Usage gets one point
per day from ``from`` to ``to`` (up to today), zeros included. Time is UTC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta

from dovecote.bus.messages.metrics import AGGREGATE_S, CapsulePoint, StatsSeries, UsagePoint
from dovecote.libs.timefmt import unix_rfc3339


def buckets(now: float, window: int, width: int) -> list[int]:
    """The starts of the ``window / width`` buckets of ``width`` seconds ending with ``now``'s."""
    last = int(now // width) * width
    count = max(1, window // width)
    return [last - (count - 1 - i) * width for i in range(count)]


def fill_series(rows: Mapping[int, tuple[int, int, int]], starts: list[int]) -> StatsSeries:
    """Parallel arrays over ``starts`` from ``{bucket: (running, vcpus, memory_mb)}``."""
    series = StatsSeries(labels=[], running=[], vcpus=[], memory_mb=[])
    for start in starts:
        running, vcpus, memory = rows.get(start, (0, 0, 0))
        series.labels.append(unix_rfc3339(start))
        series.running.append(running)
        series.vcpus.append(vcpus)
        series.memory_mb.append(memory)
    return series


def days(first: date, last: date) -> list[date]:
    """Every day from ``first`` to ``last``, both included."""
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def fill_usage(rows: Mapping[date, tuple[float, float]], first: date, last: date,
               today: date) -> list[UsagePoint]:
    """One point per day from ``first`` to ``min(last, today)``."""
    return [UsagePoint(date=day.isoformat(), cpu_minutes=round(rows.get(day, (0.0, 0.0))[0], 4),
                       ram_mb_minutes=round(rows.get(day, (0.0, 0.0))[1], 4))
            for day in days(first, min(last, today))]


def team_totals(points: Iterable[CapsulePoint]) -> dict[tuple[str, int], tuple[int, int, int]]:
    """``{(team, bucket): (capsules, vcpus, memory_mb)}`` of newly stored points."""
    totals: dict[tuple[str, int], tuple[int, int, int]] = {}
    for p in points:
        n, vcpus, memory = totals.get((p.team_id, p.ts), (0, 0, 0))
        totals[(p.team_id, p.ts)] = (n + 1, vcpus + p.vcpus, memory + p.memory_mb)
    return totals


def usage_totals(points: Iterable[CapsulePoint], interval_s: float
                 ) -> dict[tuple[str, date], tuple[float, float]]:
    """``{(team, day): (vCPU-minutes, RAM MB-minutes)}`` reserved by newly stored points.

    A point covers the time its samples span (``samples * interval_s``, at most
    one bucket): a capsule that ran 10 s of a bucket is charged 10 s.
    """
    totals: dict[tuple[str, date], tuple[float, float]] = {}
    for p in points:
        minutes = min(p.samples * interval_s, AGGREGATE_S) / 60.0
        key = (p.team_id, datetime.fromtimestamp(p.ts, UTC).date())
        cpu, ram = totals.get(key, (0.0, 0.0))
        totals[key] = (cpu + p.vcpus * minutes, ram + p.memory_mb * minutes)
    return totals
