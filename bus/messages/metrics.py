"""Messages of capsule metrics, team stats and usage, and Prometheus scrapes.

Who answers what:

* every service answers :class:`ScrapeMetrics` with its Prometheus families
  (:class:`Exposition`; ``libs/runtime.py`` registers the handler), which the
  gateway merges into ``GET /metrics``;
* ``vmmgr.<host_id>`` answers :class:`GetCapsuleMetrics` from its in-memory
  rings (``vmmgr/sampler.py``); ``available`` is false when its rings do not
  cover the asked range (the capsule is gone, or vmmgr restarted since);
* ``vmmgr`` (any host: the records are shared) answers
  :class:`GetTeamReservation`, what a team's live capsules hold now;
* ``metrics`` stores the 30-second aggregates every vmmgr hands it
  (:class:`RecordSamples`) and answers :class:`QueryCapsuleMetrics`,
  :class:`GetCapsuleStats` and :class:`GetCapsuleUsage` from them.

The response bodies are the capsules reference's schemas (``CapsuleMetrics``,
``CapsuleStats``, ``UsageResponse``), so the gateway passes them through.
The ranges both sides accept are :data:`CAPSULE_RANGES` and
:data:`STATS_RANGES`.
"""

from __future__ import annotations

import msgspec

from .base import Family, Message
from .capsules import CapsuleOp
from .common import Principal

SAMPLE_INTERVAL_S = 0.5
"""vmmgr samples every running capsule this often."""

AGGREGATE_S = 30
"""Width of the averages vmmgr hands to the metrics service."""

CAPSULE_RANGES: dict[str, tuple[int, int]] = {
    "5m": (300, 0),
    "10m": (600, 0),
    "1h": (3600, 30),
    "2h": (7200, 30),
    "6h": (21600, 300),
    "12h": (43200, 300),
    "24h": (86400, 300),
}
"""``range`` of ``/v1/capsules/{id}/metrics`` → (window, point width) in seconds.

Width 0 is the raw 500 ms samples (vmmgr's 10-minute ring), 30 the 30-second
averages (2 hours), 300 the 5-minute averages (24 hours)."""

DEFAULT_CAPSULE_RANGE = "10m"

STATS_RANGES: dict[str, tuple[int, int]] = {
    "5m": (300, 30),
    "1h": (3600, 30),
    "6h": (21600, 180),
    "24h": (86400, 720),
    "30d": (30 * 86400, 21600),
}
"""``range`` of ``/v1/capsules/stats`` → (window, bucket width) in seconds."""

DEFAULT_STATS_RANGE = "1h"

MAX_USAGE_DAYS = 92
"""The longest ``from``..``to`` span of ``/v1/capsules/usage``."""

# -- response bodies (the reference's schemas) ---------------------------------


class MetricPoint(msgspec.Struct, kw_only=True):
    """The reference's ``MetricPoint``: one sample or one average."""

    timestamp_unix: int
    cpu_pct: float
    """CPU use in percent of the capsule's vCPUs (0-100)."""
    mem_bytes: int
    """Guest memory in use (the hypervisor's resident set when the guest does not say)."""
    disk_bytes: int
    """Bytes the capsule's copy-on-write overlay occupies on the host."""


class CapsuleMetrics(msgspec.Struct, kw_only=True):
    """The reference's ``CapsuleMetrics``."""

    sandbox_id: str
    range: str
    points: list[MetricPoint]


class StatsCurrent(msgspec.Struct, kw_only=True):
    running_count: int = 0
    vcpus_reserved: int = 0
    memory_mb_reserved: int = 0
    sampled_at: str | None = None


class StatsPeaks(msgspec.Struct, kw_only=True):
    """Maximum values over the last 30 days."""

    running_count: int = 0
    vcpus: int = 0
    memory_mb: int = 0


class StatsSeries(msgspec.Struct, kw_only=True):
    """Parallel arrays for chart rendering."""

    labels: list[str] = []
    running: list[int] = []
    vcpus: list[int] = []
    memory_mb: list[int] = []


class CapsuleStats(msgspec.Struct, kw_only=True):
    """The reference's ``CapsuleStats``."""

    range: str
    current: StatsCurrent
    peaks: StatsPeaks
    series: StatsSeries


class UsagePoint(msgspec.Struct, kw_only=True):
    date: str
    cpu_minutes: float
    ram_mb_minutes: float


class UsageResponse(msgspec.Struct, kw_only=True):
    """The reference's ``UsageResponse``."""

    from_: str = msgspec.field(name="from")
    to: str
    points: list[UsagePoint]


# -- Prometheus ----------------------------------------------------------------


class MetricSample(msgspec.Struct, array_like=True):
    """One sample of a family (``name`` carries the suffix: ``_total``, ``_bucket``...)."""

    name: str
    labels: dict[str, str]
    value: float


class MetricFamily(msgspec.Struct, kw_only=True):
    """One Prometheus metric family as ``prometheus_client`` collects it."""

    name: str
    type: str
    help: str = ""
    samples: list[MetricSample] = []


class ScrapeMetrics(Message, tag="metrics.scrape"):
    """Ask a service for its Prometheus metrics (reply :class:`Exposition`)."""


class Exposition(Message, tag="metrics.exposition", kw_only=True):
    service: str
    host_id: str = ""
    families: list[MetricFamily] = []


# -- samples (vmmgr → metrics) ----------------------------------------------------


class CapsulePoint(msgspec.Struct, kw_only=True):
    """One capsule's average over one :data:`AGGREGATE_S` bucket."""

    capsule_id: str
    team_id: str
    ts: int
    """The bucket's start, unix seconds (a multiple of the bucket width)."""
    samples: int
    """How many samples the average holds (a full bucket: 60)."""
    cpu_pct: float
    mem_bytes: int
    disk_bytes: int
    vcpus: int
    memory_mb: int


class RecordSamples(Message, tag="metrics.record", kw_only=True):
    """Store closed buckets (reply :class:`SamplesRecorded`); a bucket sent twice counts once."""

    host_id: str
    interval_s: float = SAMPLE_INTERVAL_S
    points: list[CapsulePoint] = []


class SamplesRecorded(Message, tag="metrics.recorded", kw_only=True):
    accepted: int
    duplicates: int = 0


# -- one capsule's series ------------------------------------------------------------


class GetCapsuleMetrics(CapsuleOp, tag="metrics.capsule.live", kw_only=True):
    """A capsule's points from its vmmgr's rings (to ``vmmgr.<host_id>``)."""

    range: str = DEFAULT_CAPSULE_RANGE


class QueryCapsuleMetrics(Message, tag="metrics.capsule.history", kw_only=True):
    """A capsule's persisted points (to ``metrics``); scoped to the caller's team."""

    actor: Principal
    capsule_id: str
    range: str = DEFAULT_CAPSULE_RANGE
    admin: bool = False


class CapsuleMetricsReply(Message, tag="metrics.capsule.points", kw_only=True):
    """``available`` is false when the answerer holds nothing for the capsule and range."""

    body: CapsuleMetrics
    available: bool = True


# -- team stats and usage --------------------------------------------------------------


class GetTeamReservation(Message, tag="metrics.reservation", kw_only=True):
    """What the caller's team's live capsules hold now (to ``vmmgr``)."""

    actor: Principal


class TeamReservation(Message, tag="metrics.reserved", kw_only=True):
    running_count: int
    vcpus: int
    memory_mb: int


class GetCapsuleStats(Message, tag="metrics.stats", kw_only=True):
    """The caller's team's ``CapsuleStats`` (to ``metrics``); ``current`` comes from vmmgr."""

    actor: Principal
    range: str = DEFAULT_STATS_RANGE
    current: StatsCurrent = msgspec.field(default_factory=StatsCurrent)


class CapsuleStatsReply(Message, tag="metrics.stats_reply", kw_only=True):
    body: CapsuleStats


class GetCapsuleUsage(Message, tag="metrics.usage", kw_only=True):
    """The caller's team's daily usage from ``from_date`` to ``to_date`` (ISO dates, UTC)."""

    actor: Principal
    from_date: str
    to_date: str


class CapsuleUsageReply(Message, tag="metrics.usage_reply", kw_only=True):
    body: UsageResponse


FAMILY = Family("metrics", __name__)
"""The metrics messages and their one Decoder (define every message above this line)."""
