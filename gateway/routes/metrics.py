"""Capsule metrics, team stats and usage (capsules reference), and ``GET /metrics``.

``/v1/capsules/{id}/metrics?range=`` first resolves the capsule
(:class:`LookupCapsule`, team-scoped: another team's capsule is 404). A
capsule that is not stopped is asked of its vmmgr, which answers from its
in-memory rings while they cover the range; otherwise (vmmgr restarted
since, the host is unreachable, the capsule stopped) the metrics service
answers from the 30-second averages it persisted. A stopped capsule with no
persisted points left is 404, as in the reference.

``/v1/capsules/stats`` takes ``current`` from vmmgr (the capsules that count
against the team's caps, now) and the series and peaks from the metrics
service; ``/v1/capsules/usage`` is the metrics service's daily totals.

``GET /metrics`` is the Prometheus exposition of the whole suite: the
gateway's own registry plus each service's, asked over the bus
(:class:`ScrapeMetrics`) and merged family by family, every sample labelled
with the ``service`` and ``host`` that answered (concatenating the texts
would repeat families, which Prometheus refuses). ``dovecote_scrape_up``
tells which services answered. Who may read it (:func:`scrape_refusal`):
loopback clients (unless ``DOVECOTE_METRICS_ALLOW_LOOPBACK=false``, for a
proxy on the same machine) and anyone presenting ``Authorization: Bearer
$DOVECOTE_METRICS_TOKEN`` when that is set.

The gateway also counts every HTTP request here (by method, route template
and status) and times it up to its response's headers.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
import trio
from prometheus_client import Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from quart import Response, g, request

from dovecote.bus.errors import BusError
from dovecote.bus.messages import capsules as c
from dovecote.bus.messages import metrics as m
from dovecote.bus.messages.common import Principal
from dovecote.gateway.calls import call
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routing import Call, Family, Route, register_routes
from dovecote.gateway.state import GatewayState
from dovecote.libs.config import load_config
from dovecote.libs.runtime import exposition_families

EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GONE = ("stopped", "missing", "error")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

HTTP_REQUESTS = Counter("dovecote_http_requests", "HTTP requests answered, by route template and status.",
                        ["method", "route", "status"])
HTTP_SECONDS = Histogram("dovecote_http_request_duration_seconds",
                         "Time from a request to its response's headers, by route template.",
                         ["method", "route"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0))


class MetricsAccess(msgspec.Struct, kw_only=True):
    """Who may read ``/metrics`` (``DOVECOTE_METRICS_TOKEN``, ``DOVECOTE_METRICS_ALLOW_LOOPBACK``)."""

    metrics_token: str = ""
    metrics_allow_loopback: bool = True


class StatsQuery(msgspec.Struct, kw_only=True):
    """Query of ``/v1/capsules/stats`` (documentation only)."""

    range: Literal["5m", "1h", "6h", "24h", "30d"] = "1h"


class UsageQuery(msgspec.Struct, kw_only=True):
    """Query of ``/v1/capsules/usage`` (documentation only): UTC dates, at most 92 days apart."""

    from_: Annotated[str, msgspec.Meta(extra_json_schema={"format": "date"})] | None = msgspec.field(
        default=None, name="from")
    to: Annotated[str, msgspec.Meta(extra_json_schema={"format": "date"})] | None = None


class MetricsQuery(msgspec.Struct, kw_only=True):
    """Query of ``/v1/capsules/{id}/metrics`` (documentation only)."""

    range: Literal["5m", "10m", "1h", "2h", "6h", "12h", "24h"] = "10m"


# -- pure helpers ------------------------------------------------------------------


def scrape_refusal(remote_addr: str | None, authorization: str, access: MetricsAccess
                   ) -> ApiError | None:
    """Why this client may not read ``/metrics``, or None when it may."""
    token = access.metrics_token
    scheme, _, presented = authorization.partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(),
                                                                    token.encode()):
        return None
    if access.metrics_allow_loopback and _is_loopback(remote_addr):
        return None
    if token:
        return ApiError(401, "unauthorized", "a valid bearer token is required for /metrics",
                        {"WWW-Authenticate": "Bearer"})
    return ApiError(403, "forbidden", "/metrics is served to loopback clients only; "
                                      "set DOVECOTE_METRICS_TOKEN to scrape from elsewhere")


def _is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address((address or "").strip("[]")).is_loopback
    except ValueError:
        return False


def merge_families(answers: Iterable[m.Exposition]) -> list[Metric]:
    """One family per name from several services' answers, labelled with who answered.

    A sample that already has a ``service`` (or ``host``) label keeps it; a
    repeated series (several services in one process, in tests) is kept once;
    a family whose type differs from the first one of its name is left out.
    """
    merged: dict[str, Metric] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for answer in answers:
        for family in answer.families:
            metric = merged.get(family.name)
            if metric is None:
                try:
                    metric = merged[family.name] = Metric(family.name, family.help, family.type)
                except ValueError:
                    continue  # a name or type this client cannot render
            elif metric.type != family.type:
                continue
            for sample in family.samples:
                labels = dict(sample.labels)
                labels.setdefault("service", answer.service)
                if answer.host_id:
                    labels.setdefault("host", answer.host_id)
                key = (sample.name, tuple(sorted(labels.items())))
                if key not in seen:
                    seen.add(key)
                    metric.add_sample(sample.name, labels, sample.value)
    return list(merged.values())


def render(families: list[Metric]) -> bytes:
    """The Prometheus text format of ``families``."""

    class Families(Collector):
        def collect(self) -> Iterable[Metric]:
            return families

    return generate_latest(Families())


def _today() -> datetime:
    return datetime.now(UTC)


def usage_dates(raw_from: str | None, raw_to: str | None, today: datetime) -> tuple[str, str]:
    """``(from, to)`` of ``/v1/capsules/usage`` with the reference's defaults, or 400."""
    for name, value in (("from", raw_from), ("to", raw_to)):
        if value is not None and not _DATE.match(value):
            raise ApiError(400, "invalid_request", f"{name} must be YYYY-MM-DD")
    try:
        last = datetime.strptime(raw_to, "%Y-%m-%d").date() if raw_to else today.date()
        first = (datetime.strptime(raw_from, "%Y-%m-%d").date() if raw_from
                 else last - timedelta(days=29))
    except ValueError:
        raise ApiError(400, "invalid_request", "from and to must be valid dates (YYYY-MM-DD)") from None
    if first > last:
        raise ApiError(400, "invalid_request", "from must be before or equal to to")
    if (last - first).days > m.MAX_USAGE_DAYS:
        raise ApiError(400, "invalid_request", f"the range cannot exceed {m.MAX_USAGE_DAYS} days")
    return first.isoformat(), last.isoformat()


# -- routes --------------------------------------------------------------------------


def register(state: GatewayState) -> None:
    """Add the metrics routes, ``/metrics`` and the HTTP request counters."""
    app = state.app
    access = load_config(MetricsAccess)

    @app.before_request
    async def _start_timer() -> None:
        g.dovecote_started = time.perf_counter()

    @app.after_request
    async def _count_request(response: Response) -> Response:
        rule = request.url_rule
        route = rule.rule if rule is not None else "unmatched"
        HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        started = g.get("dovecote_started")
        if started is not None:
            HTTP_SECONDS.labels(request.method, route).observe(time.perf_counter() - started)
        return response

    register_routes(state, METRICS, [
        Route(method="GET", path="/metrics", name="prometheus_metrics",
              summary="Prometheus metrics of every service", tags=["meta"], auth="public",
              handle=functools.partial(_prometheus, access)),
        *ROUTES])


async def _prometheus(access: MetricsAccess, ctx: Call) -> Response:
    refusal = scrape_refusal(request.remote_addr, request.headers.get("Authorization", ""), access)
    if refusal is not None:
        raise refusal
    answers = await scrape_all(ctx.state)
    return Response(render(merge_families(answers)), status=200, content_type=EXPOSITION_TYPE)


async def _stats(ctx: Call) -> Any:
    range_name = request.args.get("range", m.DEFAULT_STATS_RANGE)
    if range_name not in m.STATS_RANGES:
        raise ApiError(400, "invalid_request", "range must be one of " + ", ".join(m.STATS_RANGES))
    held: m.TeamReservation = await call(ctx.state, "vmmgr", m.GetTeamReservation(actor=ctx.actor))
    current = m.StatsCurrent(running_count=held.running_count, vcpus_reserved=held.vcpus,
                             memory_mb_reserved=held.memory_mb,
                             sampled_at=_today().isoformat(timespec="seconds").replace("+00:00", "Z"))
    reply: m.CapsuleStatsReply = await call(ctx.state, "metrics", m.GetCapsuleStats(
        actor=ctx.actor, range=range_name, current=current))
    return reply.body


def _usage(ctx: Call) -> m.GetCapsuleUsage:
    first, last = usage_dates(request.args.get("from"), request.args.get("to"), _today())
    return m.GetCapsuleUsage(actor=ctx.actor, from_date=first, to_date=last)


async def capsule_metrics(state: GatewayState, actor: Principal, capsule_id: str, admin: bool) -> Any:
    """A capsule's metrics: live from its vmmgr while it runs, else the persisted averages."""
    range_name = request.args.get("range", m.DEFAULT_CAPSULE_RANGE)
    if range_name not in m.CAPSULE_RANGES:
        raise ApiError(400, "invalid_request", "range must be one of " + ", ".join(m.CAPSULE_RANGES))
    if not capsule_id or len(capsule_id) > 64 or not capsule_id.isprintable():
        raise ApiError(404, "not_found", "capsule not found")
    found: c.CapsuleReply = await call(state, "vmmgr", c.LookupCapsule(
        actor=actor, capsule_id=capsule_id, admin=admin))
    status = found.capsule.status
    if status not in GONE:
        try:
            live: m.CapsuleMetricsReply = await call(
                state, f"vmmgr.{found.host_id}", m.GetCapsuleMetrics(
                    actor=actor, capsule_id=capsule_id, admin=admin, range=range_name),
                timeout_s=5.0)
            if live.available:
                return live.body
        except ApiError as exc:
            if exc.status != 503:  # the host is down: its history is still here
                raise
    history: m.CapsuleMetricsReply = await call(state, "metrics", m.QueryCapsuleMetrics(
        actor=actor, capsule_id=capsule_id, range=range_name, admin=admin))
    if not history.available and status in GONE:
        raise ApiError(404, "not_found", f"no metrics are kept for capsule {capsule_id} ({status})")
    return history.body


METRICS = Family(tags=["capsules"], service="metrics")
"""The query strings are read by hand (the reference's ``range``/``from``/``to`` rules); documented."""

ROUTES = [
    Route(method="GET", path="/v1/capsules/stats", name="get_capsule_stats",
          summary="Get capsule usage stats for your team", query=StatsQuery, parse_query=False,
          response=m.CapsuleStats, handle=_stats),
    Route(method="GET", path="/v1/capsules/usage", name="get_capsule_usage",
          summary="Get daily CPU and RAM usage for your team", query=UsageQuery, parse_query=False,
          response=m.UsageResponse, message=_usage, reply=lambda reply: reply.body),
    Route(method="GET", path="/v1/capsules/{id}/metrics", name="get_capsule_metrics",
          summary="Get per-capsule resource metrics", query=MetricsQuery, parse_query=False,
          response=m.CapsuleMetrics,
          handle=lambda ctx: capsule_metrics(ctx.state, ctx.actor, ctx.params["id"], admin=False)),
    Route(method="GET", path="/v1/admin/capsules/{id}/metrics", name="admin_get_capsule_metrics",
          summary="Get per-capsule resource metrics (admin)", tags=["admin"], auth="admin",
          query=MetricsQuery, parse_query=False, response=m.CapsuleMetrics,
          handle=lambda ctx: capsule_metrics(ctx.state, ctx.actor, ctx.params["id"], admin=True)),
]


async def scrape_all(state: GatewayState) -> list[m.Exposition]:
    """The gateway's own families and every other service's, asked concurrently."""
    config = state.config
    answers: dict[str, m.Exposition] = {
        "gateway": m.Exposition(service="gateway", host_id=config.host_id, families=exposition_families())}
    names = [name for name in config.service_names() if name != "gateway"]

    async def scrape(name: str) -> None:
        try:
            reply: Any = await state.bus.request(name, m.ScrapeMetrics(), timeout=config.health_timeout_s)
        except BusError:
            return
        if isinstance(reply, m.Exposition):
            answers[name] = reply

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(scrape, name)
    up = m.MetricFamily(name="dovecote_scrape_up", type="gauge",
                        help="Whether the service answered the gateway's scrape (1) or not (0).",
                        samples=[m.MetricSample("dovecote_scrape_up", {"service": name},
                                                1.0 if name in answers else 0.0)
                                 for name in ["gateway", *names]])
    ordered = [answers[name] for name in ["gateway", *names] if name in answers]
    ordered[0].families.append(up)
    return ordered
