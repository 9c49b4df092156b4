"""``GET /healthz``: every service's health as seen over the bus.

The gateway pings each service by name through the broker, concurrently and
with a short timeout, so the answer says what a request would meet: 200 when
all answer, 503 listing the names that did not.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio
from quart import Response

from dovecote.bus import Ping, Pong
from dovecote.bus.errors import BusError
from dovecote.gateway.routing import Family, Route, register_routes
from dovecote.gateway.state import GatewayState


class ServiceHealth(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One service's health."""

    status: str
    version: str | None = None
    uptime_s: float | None = None
    latency_ms: float | None = None
    details: dict[str, str] = {}
    error: str | None = None


class Health(msgspec.Struct, kw_only=True):
    """The body of ``/healthz``."""

    status: str
    services: dict[str, ServiceHealth]
    failing: list[str]


async def check_health(state: GatewayState) -> Health:
    """Ping every service over the bus and gather the answers."""
    results: dict[str, ServiceHealth] = {}

    async def probe(name: str) -> None:
        started = trio.current_time()
        try:
            reply: Any = await state.bus.request(name, Ping(), timeout=state.config.health_timeout_s)
        except BusError as exc:
            results[name] = ServiceHealth(status="down", error=f"{type(exc).__name__}: {exc}")
            return
        if not isinstance(reply, Pong):
            results[name] = ServiceHealth(status="down", error="unexpected reply")
            return
        results[name] = ServiceHealth(
            status=reply.status, version=reply.version, uptime_s=reply.uptime_s,
            latency_ms=round((trio.current_time() - started) * 1000, 2), details=reply.details)

    async with trio.open_nursery() as nursery:
        for name in state.config.service_names():
            nursery.start_soon(probe, name)
    failing = sorted(name for name, health in results.items() if health.status != "ok")
    ordered = {name: results[name] for name in state.config.service_names()}
    return Health(status="ok" if not failing else "degraded", services=ordered, failing=failing)


def _answer(health: Health) -> Response:
    return Response(msgspec.json.encode(health), status=200 if not health.failing else 503,
                    content_type="application/json")


HEALTH = Family(tags=["health"], auth="public")

ROUTES = [
    Route(method="GET", path="/healthz", name="healthz", summary="Health of every service",
          response=Health, responses={503: Health},
          handle=lambda ctx: check_health(ctx.state), reply=_answer),
]


def register(state: GatewayState) -> None:
    """Add the health routes to the app."""
    register_routes(state, HEALTH, ROUTES)
