"""``POST /v1/hosts/sandbox-events`` (capsules reference, tag hosts): what a host agent
reports about its capsules on its own (a TTL reaper's pause, a crash).

The caller is a host (``X-Host-Token``, :meth:`Edge.authenticate_host`; 401
without a valid one). The body's ``host_id`` must be the token's host and
the capsule must run on that host (403 ``host_mismatch`` otherwise; an
unknown capsule is 404). The capsule and its team come from vmmgr
(:class:`~dovecote.bus.messages.capsules.LookupCapsule`, asked with the
gateway's own system principal since a host belongs to no team or to
another one). The report becomes a lifecycle event of the capsule's team
(:func:`~dovecote.bus.messages.events.record_event`), answered 204 once the
event log holds it (503 when it could not be recorded, so the host retries):

========================  ==========================================================
host event                lifecycle event
========================  ==========================================================
``sandbox.auto_paused``   ``capsule.pause``, outcome success, reason ``ttl_expired``
``sandbox.stopped``       ``capsule.destroy``, outcome success, reason ``host_failure``
``sandbox.error``         ``capsule.state.changed`` to ``error``, with ``error``
anything else             recorded under its own name, as the reference forwards it
========================  ==========================================================

The event's ``sandbox`` is the capsule record with the status the host
reported. The record itself is vmmgr's and is not changed here.

Bodies may carry fields this version does not know (host agents may be newer);
``timestamp`` is Unix time in seconds (values above 10^12 are taken as
milliseconds), the time of the request when absent.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from dovecote.bus.messages import capsules as c
from dovecote.bus.messages.common import Principal
from dovecote.bus.messages.events import (
    EventActor,
    EventResource,
    LifecycleEvent,
    record_event,
)
from dovecote.gateway.calls import call
from dovecote.gateway.errors import ApiError, Error
from dovecote.gateway.routing import Call, Family, Route, register_routes
from dovecote.gateway.state import GatewayState
from dovecote.libs.timefmt import now_rfc3339, unix_rfc3339

EVENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MS_THRESHOLD = 10**12
MAX_TIMESTAMP_S = 253402300799  # 9999-12-31T23:59:59Z

LOOKUP_ACTOR = Principal(auth_type="system", name="gateway: host sandbox events", is_admin=True)
"""Who asks vmmgr for a host's capsule: the gateway itself, which checks the host."""

# host event -> (lifecycle event, outcome, capsule status, metadata reason)
KNOWN: dict[str, tuple[str, str | None, str, str]] = {
    "sandbox.auto_paused": ("capsule.pause", "success", "paused", "ttl_expired"),
    "sandbox.stopped": ("capsule.destroy", "success", "stopped", "host_failure"),
    "sandbox.error": ("capsule.state.changed", None, "error", "host_failure"),
}


class SandboxEventRequest(msgspec.Struct, kw_only=True):
    """The reference's callback body."""

    event: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    sandbox_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    host_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    timestamp: Annotated[int, msgspec.Meta(ge=0)] | None = None


def event_time(timestamp: int | None) -> str:
    """The reference's date-time of a Unix ``timestamp`` (seconds, or milliseconds), or 400."""
    if timestamp is None:
        return now_rfc3339()
    seconds = timestamp / 1000 if timestamp >= MS_THRESHOLD else float(timestamp)
    if seconds > MAX_TIMESTAMP_S:
        raise ApiError(400, "invalid_request", "timestamp is not a Unix time")
    return unix_rfc3339(seconds)


def to_lifecycle(body: SandboxEventRequest, capsule: c.Capsule) -> LifecycleEvent:
    """The lifecycle event a host's report stands for (see the module docstring)."""
    actor = EventActor(type="system", id=body.host_id, name="host")
    resource = EventResource(id=capsule.id, type="capsule")
    timestamp = event_time(body.timestamp)
    known = KNOWN.get(body.event)
    if known is None:
        return LifecycleEvent(event=body.event, resource=resource, actor=actor, timestamp=timestamp,
                              metadata={"host_id": body.host_id}, sandbox=capsule)
    name, outcome, status, reason = known
    metadata = {"reason": reason, "host_id": body.host_id, "host_event": body.event}
    error = None
    if name == "capsule.state.changed":
        metadata.update({"from": capsule.status, "to": status})
        error = "the host reported an error"
    return LifecycleEvent(event=name, resource=resource, actor=actor, timestamp=timestamp,
                          outcome=outcome, metadata=metadata, error=error,
                          sandbox=msgspec.structs.replace(capsule, status=status))


async def _sandbox_event(ctx: Call) -> None:
    host: Principal = ctx.actor
    body: SandboxEventRequest = ctx.body
    if not EVENT_NAME.match(body.event):
        raise ApiError(400, "invalid_request",
                       "event must be 1 to 64 of a-z, 0-9, '_', '.', '-' (e.g. sandbox.stopped)")
    if not body.sandbox_id.isprintable():
        raise ApiError(400, "invalid_request", "invalid sandbox_id")
    if body.host_id != host.host_id:
        raise ApiError(403, "host_mismatch", "host_id does not match the host token")
    event_time(body.timestamp)  # 400 before anything is looked up
    found: c.CapsuleReply = await call(ctx.state, "vmmgr", c.LookupCapsule(
        actor=LOOKUP_ACTOR, capsule_id=body.sandbox_id, admin=True))
    if found.host_id != host.host_id:
        raise ApiError(403, "host_mismatch", "the capsule does not run on this host")
    recorded = await record_event(ctx.state.bus.request, found.team_id, to_lifecycle(body, found.capsule))
    if recorded is None:
        raise ApiError(503, "service_unavailable", "the event could not be recorded; retry")


HOST_EVENTS = Family(tags=["hosts"], auth="host")

ROUTES = [
    Route(method="POST", path="/v1/hosts/sandbox-events", name="sandbox_event_callback",
          summary="Sandbox lifecycle event callback", request=SandboxEventRequest, status=204,
          responses={400: Error, 403: Error}, handle=_sandbox_event),
]


def register(state: GatewayState) -> None:
    """Add the host event callback (the table above)."""
    register_routes(state, HOST_EVENTS, ROUTES)
