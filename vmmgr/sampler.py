"""Resource samples of this host's capsules: rings, tiers and the sampling loop.

Every :data:`~dovecote.bus.messages.metrics.SAMPLE_INTERVAL_S` (500 ms) the
:class:`Sampler` reads each running capsule's counters through the driver
(:meth:`Driver.stats`) and turns them into a :class:`Point`: CPU in percent of
the capsule's vCPUs (the vCPU time used since the previous reading over the
wall time between them), guest memory in use, and the bytes the capsule's
overlay occupies on the host. Each capsule keeps three tiers in memory
(:class:`Rings`):

========  ==================  ==========  =========
tier      point               kept        points
========  ==================  ==========  =========
raw       one 500 ms sample   10 minutes  1200
30 s      average of samples  2 hours     240
5 min     average of samples  24 hours    288
========  ==================  ==========  =========

Averages are over the raw samples of an aligned bucket (``ts`` is the
bucket's start, a multiple of its width in unix seconds), weighted by how many
samples each holds, so a bucket half-covered (the capsule started or paused
inside it) is the average of what was seen. A bucket closes when a sample
of a later bucket arrives, or once its end has passed (a paused capsule's last
bucket). Each closed 30 s average is handed to the metrics service
(:class:`~dovecote.bus.messages.metrics.RecordSamples`), which persists it;
unsent points wait in a bounded queue and are retried.

``vmmgr.<host_id>`` answers :class:`GetCapsuleMetrics` from the rings while
they cover the asked window: they began before the window (or before the
capsule started). After a vmmgr restart they do not, and the gateway asks the
metrics service instead. The rings of a capsule are dropped when its record
leaves this host's live statuses (stopped, missing, error) — a paused
capsule keeps its history here.

The pure part (:class:`Tier`, :class:`Rings`, :func:`cpu_percent`) does no
I/O and takes explicit timestamps, so the tiers are tested with synthetic
clocks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import trio
from prometheus_client import Counter, Gauge, Histogram

from dovecote.bus.messages.metrics import (
    AGGREGATE_S,
    CAPSULE_RANGES,
    SAMPLE_INTERVAL_S,
    CapsuleMetrics,
    CapsuleMetricsReply,
    CapsulePoint,
    GetCapsuleMetrics,
    GetTeamReservation,
    MetricPoint,
    RecordSamples,
    TeamReservation,
)
from dovecote.libs.db import Database
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsule_store import CapsuleStore, Status
from dovecote.vmmgr.driver import Driver, DriverError, VmNotFound
from dovecote.vmmgr.machines import Machines

log = get_logger("dovecote.vmmgr.sampler")

RAW_WINDOW_S = 600
MID_WIDTH_S, MID_WINDOW_S = AGGREGATE_S, 7200
LONG_WIDTH_S, LONG_WINDOW_S = 300, 86400
COVER_GRACE_S = 15.0
"""Rings that began this long after the capsule started still count as covering it."""
MAX_PENDING = 50_000
"""Closed 30 s points waiting for the metrics service (about 4 h of 100 capsules)."""
MAX_BATCH = 2_000

CAPSULES = Gauge("dovecote_capsules", "Capsules whose records name this host, by status.", ["status"])
SAMPLES = Counter("dovecote_sampler_samples", "Capsule samples taken.")
SAMPLE_ERRORS = Counter("dovecote_sampler_errors", "Capsule samples the driver could not take.")
TICK_SECONDS = Histogram("dovecote_sampler_tick_duration_seconds", "Time to sample every running capsule.",
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
PENDING = Gauge("dovecote_sampler_pending_points", "30 s averages waiting for the metrics service.")
SENT = Counter("dovecote_sampler_sent_points", "30 s averages the metrics service stored.")
DROPPED = Counter("dovecote_sampler_dropped_points", "30 s averages dropped: the queue was full.")
SAMPLED_CAPSULES = Gauge("dovecote_sampler_capsules", "Capsules with rings on this host.")

Send = Callable[[RecordSamples], Awaitable[Any]]


# -- the pure part ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """One sample (``samples == 1``) or the average of ``samples`` samples of a bucket."""

    ts: float
    """Unix seconds: when the sample was taken, or the bucket's start."""
    cpu_pct: float
    mem_bytes: int
    disk_bytes: int
    samples: int = 1


class _Sums:
    __slots__ = ("cpu", "disk", "mem", "n", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.n = 0
        self.cpu = 0.0
        self.mem = 0.0
        self.disk = 0.0

    def add(self, point: Point) -> None:
        self.n += point.samples
        self.cpu += point.cpu_pct * point.samples
        self.mem += point.mem_bytes * point.samples
        self.disk += point.disk_bytes * point.samples

    def average(self) -> Point:
        return Point(ts=self.start, cpu_pct=self.cpu / self.n, mem_bytes=round(self.mem / self.n),
                     disk_bytes=round(self.disk / self.n), samples=self.n)


class Tier:
    """Averages over aligned buckets of ``width`` seconds, kept for ``window`` seconds."""

    def __init__(self, width: float, window: float) -> None:
        self.width = width
        self.window = window
        self.points: deque[Point] = deque(maxlen=int(window // width) + 1)
        self._open: _Sums | None = None

    def add(self, point: Point) -> Point | None:
        """Count ``point`` in its bucket; returns the bucket it closed, if any."""
        start = point.ts - point.ts % self.width
        closed = None
        if self._open is not None and self._open.start != start:
            if start < self._open.start:
                return None  # the clock stepped back: drop it rather than reopen history
            closed = self._close()
        if self._open is None:
            self._open = _Sums(start)
        self._open.add(point)
        self._evict(point.ts)
        return closed

    def flush(self, now: float, *, force: bool = False) -> Point | None:
        """Close the open bucket once its end has passed (or now, with ``force``)."""
        closed = None
        if self._open is not None and (force or now >= self._open.start + self.width):
            closed = self._close()
        self._evict(now)
        return closed

    def since(self, cutoff: float) -> list[Point]:
        """Closed buckets that end after ``cutoff``, oldest first."""
        return [p for p in self.points if p.ts + self.width > cutoff]

    def _close(self) -> Point:
        assert self._open is not None
        point = self._open.average()
        self._open = None
        self.points.append(point)
        return point

    def _evict(self, now: float) -> None:
        while self.points and self.points[0].ts + self.width <= now - self.window:
            self.points.popleft()


class Rings:
    """One capsule's tiers: raw samples, 30 s and 5 min averages."""

    def __init__(self, began: float) -> None:
        self.began = began
        """When these rings took their first reading (unix seconds)."""
        self.raw: deque[Point] = deque(maxlen=int(RAW_WINDOW_S / SAMPLE_INTERVAL_S))
        self.mid = Tier(MID_WIDTH_S, MID_WINDOW_S)
        self.long = Tier(LONG_WIDTH_S, LONG_WINDOW_S)

    def add(self, point: Point) -> Point | None:
        """Add a raw sample; returns the 30 s average it closed, if any."""
        self.raw.append(point)
        self._evict_raw(point.ts)
        self.long.add(point)
        return self.mid.add(point)

    def flush(self, now: float, *, force: bool = False) -> Point | None:
        """Close buckets whose end has passed; returns the closed 30 s average, if any."""
        self._evict_raw(now)
        self.long.flush(now, force=force)
        return self.mid.flush(now, force=force)

    def points(self, window: float, width: int, now: float) -> list[Point]:
        """The points of the last ``window`` seconds from the tier of ``width`` (0: raw)."""
        cutoff = now - window
        if width == 0:
            return [p for p in self.raw if p.ts > cutoff]
        return (self.mid if width == MID_WIDTH_S else self.long).since(cutoff)

    def covers(self, window: float, now: float, started_at: float | None) -> bool:
        """Whether these rings saw all there was to see of the last ``window`` seconds."""
        start = now - window
        if started_at is not None:
            start = max(start, started_at)
        return self.began <= start + COVER_GRACE_S

    def _evict_raw(self, now: float) -> None:
        while self.raw and self.raw[0].ts <= now - RAW_WINDOW_S:
            self.raw.popleft()


def cpu_percent(prev: tuple[float, int] | None, cur: tuple[float, int], vcpus: int) -> float | None:
    """CPU use between two ``(seconds, cpu_time_ns)`` readings in percent of ``vcpus``.

    None when there is no rate to tell: no earlier reading, time did not
    advance, or the counter went back (the VM was restored).
    """
    if prev is None or vcpus <= 0:
        return None
    elapsed, used = cur[0] - prev[0], cur[1] - prev[1]
    if elapsed <= 0 or used < 0:
        return None
    return min(100.0, used / (elapsed * 1e9 * vcpus) * 100.0)


def metric_points(points: Iterable[Point]) -> list[MetricPoint]:
    """The reference's ``MetricPoint`` of each point."""
    return [MetricPoint(timestamp_unix=int(p.ts), cpu_pct=round(p.cpu_pct, 3), mem_bytes=p.mem_bytes,
                        disk_bytes=p.disk_bytes) for p in points]


# -- the sampler -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Tracked:
    """A capsule record of this host in a live status (read every few seconds)."""

    capsule_id: str
    team_id: str
    vcpus: int
    memory_mb: int
    status: str
    started_at: float | None = None


@dataclass(kw_only=True)
class _Capsule:
    info: Tracked
    rings: Rings
    prev: tuple[float, int] | None = None


class Sampler:
    """Samples this host's running capsules, keeps their rings and hands averages on.

    Args:
        db: vmmgr's database (the capsule records), or None in tests that set
            :attr:`tracked` themselves.
        host_id: this host.
        machines: where the driver appears once the hypervisor is up.
        send: sends a :class:`RecordSamples` to the metrics service and returns
            its reply (raises on bus errors).
        wall, mono: the wall clock (timestamps) and a monotonic one (rates).
    """

    def __init__(self, *, db: Database | None, host_id: str, machines: Machines, send: Send,
                 interval_s: float = SAMPLE_INTERVAL_S, refresh_s: float = 2.0, send_every_s: float = 5.0,
                 wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.store = CapsuleStore(db) if db is not None else None
        self.host_id = host_id
        self.machines = machines
        self.interval_s = interval_s
        self.refresh_s = refresh_s
        self.send_every_s = send_every_s
        self.tracked: dict[str, Tracked] = {}
        self.capsules: dict[str, _Capsule] = {}
        self.pending: list[CapsulePoint] = []
        self._send = send
        self._wall = wall
        self._mono = mono
        self._send_failing = False

    def register(self, handle: Callable[[type, Any], None]) -> None:
        handle(GetCapsuleMetrics, self.capsule_metrics)
        handle(GetTeamReservation, self.team_reservation)

    # -- loops -----------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh, sample and send until cancelled; then hand over what is left (2 s at most)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._sample_loop)
                nursery.start_soon(self._send_loop)
                task_status.started()
        finally:
            with trio.move_on_after(2.0) as scope:
                scope.shield = True
                self.close_all()
                await self.send_pending()

    async def _refresh_loop(self) -> None:
        rounds = 0
        while True:
            try:
                await self.refresh(count_statuses=rounds % 5 == 0)
            except Exception:
                log.warning("could not read this host's capsules", exc_info=True)
            rounds += 1
            await trio.sleep(self.refresh_s)

    async def _sample_loop(self) -> None:
        next_at = trio.current_time()
        while True:
            began = time.perf_counter()
            await self.sample_once()
            TICK_SECONDS.observe(time.perf_counter() - began)
            next_at = max(next_at + self.interval_s, trio.current_time())  # late: skip, never burst
            await trio.sleep_until(next_at)

    async def _send_loop(self) -> None:
        while True:
            await trio.sleep(self.send_every_s)
            await self.send_pending()

    # -- steps (each one testable on its own) --------------------------------------

    async def refresh(self, *, count_statuses: bool = False) -> None:
        """Read this host's live capsule records; drop the rings of capsules that left."""
        assert self.store is not None
        rows = await self.store.live_on_host(self.host_id)
        self.set_tracked(Tracked(capsule_id=r["id"], team_id=r["team_id"], vcpus=r["vcpus"],
                                 memory_mb=r["memory_mb"], status=r["status"],
                                 started_at=_unix(r["started_at"])) for r in rows)
        if count_statuses:
            by_status = await self.store.count_by_status(self.host_id)
            for status in Status:
                CAPSULES.labels(status).set(by_status.get(status, 0))

    def set_tracked(self, tracked: Iterable[Tracked]) -> None:
        """Replace the live records; capsules no longer among them hand over their last bucket."""
        self.tracked = {t.capsule_id: t for t in tracked}
        now = self._wall()
        for capsule_id in list(self.capsules):
            entry = self.capsules[capsule_id]
            info = self.tracked.get(capsule_id)
            if info is None:
                self._queue(entry, entry.rings.flush(now, force=True))
                del self.capsules[capsule_id]
                continue
            entry.info = info
            if info.status != Status.RUNNING:
                entry.prev = None  # no rate across a pause
        SAMPLED_CAPSULES.set(len(self.capsules))

    async def sample_once(self) -> None:
        """Read every running capsule once, then close the buckets whose end has passed."""
        now = self._wall()
        driver = self.machines.driver
        if driver is not None:
            async with trio.open_nursery() as nursery:
                for info in list(self.tracked.values()):
                    if info.status == Status.RUNNING:
                        nursery.start_soon(self._sample_one, driver, info, now)
        for entry in self.capsules.values():
            self._queue(entry, entry.rings.flush(now))

    async def _sample_one(self, driver: Driver, info: Tracked, now: float) -> None:
        try:
            stats = await driver.stats(info.capsule_id)
        except VmNotFound:
            entry = self.capsules.get(info.capsule_id)
            if entry is not None:
                entry.prev = None
            return
        except DriverError as exc:
            SAMPLE_ERRORS.inc()
            log.debug("could not sample a capsule", extra={"capsule_id": info.capsule_id,
                                                          "error": str(exc)})
            return
        except Exception:  # one capsule's failure never stops the sampling of the others
            SAMPLE_ERRORS.inc()
            log.warning("could not sample a capsule", exc_info=True,
                        extra={"capsule_id": info.capsule_id})
            return
        reading = (self._mono(), stats.cpu_time_ns)
        entry = self.capsules.get(info.capsule_id)
        if entry is None:
            if info.capsule_id not in self.tracked:
                return  # it left while we read it
            entry = self.capsules[info.capsule_id] = _Capsule(info=info, rings=Rings(began=now))
            SAMPLED_CAPSULES.set(len(self.capsules))
        cpu = cpu_percent(entry.prev, reading, stats.vcpus or info.vcpus)
        entry.prev = reading
        if cpu is None:
            return
        SAMPLES.inc()
        self._queue(entry, entry.rings.add(Point(ts=now, cpu_pct=cpu, mem_bytes=stats.memory_bytes,
                                                 disk_bytes=stats.disk_bytes)))

    def close_all(self) -> None:
        """Hand over every open 30 s bucket now (the service is stopping)."""
        now = self._wall()
        for entry in self.capsules.values():
            self._queue(entry, entry.rings.flush(now, force=True))

    def _queue(self, entry: _Capsule, point: Point | None) -> None:
        if point is None:
            return
        info = entry.info
        self.pending.append(CapsulePoint(
            capsule_id=info.capsule_id, team_id=info.team_id, ts=int(point.ts), samples=point.samples,
            cpu_pct=round(point.cpu_pct, 3), mem_bytes=point.mem_bytes, disk_bytes=point.disk_bytes,
            vcpus=info.vcpus, memory_mb=info.memory_mb))
        if len(self.pending) > MAX_PENDING:
            DROPPED.inc(len(self.pending) - MAX_PENDING)
            del self.pending[:len(self.pending) - MAX_PENDING]
        PENDING.set(len(self.pending))

    async def send_pending(self) -> bool:
        """Hand the waiting averages to the metrics service; False if it did not take them."""
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            try:
                await self._send(RecordSamples(host_id=self.host_id, interval_s=self.interval_s,
                                               points=batch))  # a refusal raises
            except Exception as exc:
                self.pending = (batch + self.pending)[-MAX_PENDING:]
                PENDING.set(len(self.pending))
                if not self._send_failing:  # say it once per outage, not every 5 s
                    log.warning("the metrics service did not take the samples; will retry",
                                extra={"error": f"{type(exc).__name__}: {exc}", "pending": len(self.pending)})
                self._send_failing = True
                return False
            SENT.inc(len(batch))
            if self._send_failing:
                log.info("the metrics service takes samples again")
                self._send_failing = False
        PENDING.set(0)
        return True

    # -- bus handlers ----------------------------------------------------------------

    async def capsule_metrics(self, msg: GetCapsuleMetrics) -> CapsuleMetricsReply:
        """The capsule's points from the rings, if they cover the range (``available``)."""
        if msg.range not in CAPSULE_RANGES:
            raise ServiceError(400, "invalid_request",
                               "range must be one of " + ", ".join(CAPSULE_RANGES))
        if msg.admin and not msg.actor.is_admin:
            raise ServiceError(403, "forbidden", "platform admin access required")
        body = CapsuleMetrics(sandbox_id=msg.capsule_id, range=msg.range, points=[])
        entry = self.capsules.get(msg.capsule_id)
        if entry is None:
            return CapsuleMetricsReply(body=body, available=False)
        if not msg.admin and entry.info.team_id != msg.actor.team_id:
            raise ServiceError(404, "not_found", "capsule not found")
        window, width = CAPSULE_RANGES[msg.range]
        now = self._wall()
        if not entry.rings.covers(window, now, entry.info.started_at):
            return CapsuleMetricsReply(body=body, available=False)
        body.points = metric_points(entry.rings.points(window, width, now))
        return CapsuleMetricsReply(body=body)

    async def team_reservation(self, msg: GetTeamReservation) -> TeamReservation:
        """What the team's live capsules (those that count against its caps) hold now."""
        assert self.store is not None
        usage = await self.store.team_usage(msg.actor.team_id)
        return TeamReservation(running_count=usage.capsules, vcpus=usage.vcpus, memory_mb=usage.memory_mb)


def _unix(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None
