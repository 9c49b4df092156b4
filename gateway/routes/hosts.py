"""``/v1/hosts*`` (capsules reference, tag hosts): host records, registration,
host tokens, heartbeats and tags.

Three kinds of caller: the management routes are ``sessionAuth`` (a request
with only ``X-API-Key`` gets 403 ``session_required``); ``POST
/v1/hosts/register`` and ``POST /v1/hosts/auth/refresh`` carry their own
credential in the body (the one-time registration token, the refresh token);
``POST /v1/hosts/{id}/heartbeat`` needs the host JWT in ``X-Host-Token``
(:meth:`Edge.authenticate_host`). Auth decides who may see and change which
host (see ``services/auth/hosts.py``).
"""

from __future__ import annotations

from quart import Response, request

from dovecote.bus.messages import hosts as h
from dovecote.gateway.calls import client_info, json_response, no_content
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routing import Call, Family, Route, path_id, register_routes
from dovecote.gateway.schemas import hosts as s
from dovecote.gateway.state import GatewayState

MAX_ID = 64
TRUE, FALSE = {"true", "1"}, {"false", "0", ""}


def _id(value: str, what: str = "host id") -> str:
    """A path identifier, or 400."""
    return path_id(value, ApiError(400, "invalid_request", f"invalid {what}"))


def _force() -> bool:
    """The ``force`` query parameter (true/false/1/0), or 400."""
    raw = request.args.get("force", "").strip().lower()
    if raw not in TRUE | FALSE:
        raise ApiError(400, "invalid_request", "force must be true or false")
    return raw in TRUE


def _host(ctx: Call) -> str:
    return _id(ctx.params["id"])


def _delete_host(ctx: Call) -> h.DeleteHost:
    force = _force()
    return h.DeleteHost(actor=ctx.actor, host_id=_host(ctx), force=force, client=client_info())


def _deleted(reply: h.HostDeleted | h.HostDeleteBlocked) -> Response:
    if isinstance(reply, h.HostDeleteBlocked):
        return json_response(s.HostHasCapsulesError(error=s.HostHasCapsulesErrorBody(
            code="host_has_sandboxes", message=reply.message, sandbox_ids=reply.sandbox_ids)), 409)
    return no_content()


HOSTS = Family(tags=["hosts"], service="auth", auth="session")

ROUTES = [
    Route(method="POST", path="/v1/hosts", name="create_host", summary="Create a host",
          request=s.CreateHostRequest, response=s.CreateHostResponse, status=201,
          message=lambda ctx: h.CreateHost(
              actor=ctx.actor, host_type=ctx.body.type, team_id=ctx.body.team_id,
              provider=ctx.body.provider, availability_zone=ctx.body.availability_zone,
              client=client_info()),
          reply=lambda reply: reply.body),
    Route(method="GET", path="/v1/hosts", name="list_hosts", summary="List hosts",
          response=list[s.Host], message=lambda ctx: h.ListHosts(actor=ctx.actor),
          reply=lambda reply: reply.hosts),
    Route(method="GET", path="/v1/hosts/{id}", name="get_host", summary="Get host details",
          response=s.Host, message=lambda ctx: h.GetHost(actor=ctx.actor, host_id=_host(ctx)),
          reply=lambda reply: reply.body),
    # A forced delete waits for vmmgr to destroy the host's capsules.
    Route(method="DELETE", path="/v1/hosts/{id}", name="delete_host", summary="Delete a host",
          status=204, responses={409: s.HostHasCapsulesError}, query=s.DeleteHostQuery,
          parse_query=False, message=_delete_host, timeout_s=90, reply=_deleted),
    Route(method="POST", path="/v1/hosts/{id}/token", name="regenerate_host_token",
          summary="Regenerate registration token", response=s.CreateHostResponse, status=201,
          message=lambda ctx: h.RegenerateHostToken(actor=ctx.actor, host_id=_host(ctx),
                                                    client=client_info()),
          reply=lambda reply: reply.body),
    Route(method="POST", path="/v1/hosts/register", name="register_host",
          summary="Register a host agent", auth="public", request=s.RegisterHostRequest,
          response=s.RegisterHostResponse, status=201,
          message=lambda ctx: h.RegisterHost(token=ctx.body.token, specs=h.HostSpecs(
              arch=ctx.body.arch, cpu_cores=ctx.body.cpu_cores, memory_mb=ctx.body.memory_mb,
              disk_gb=ctx.body.disk_gb, address=ctx.body.address), client=client_info()),
          reply=lambda reply: reply.body),
    Route(method="POST", path="/v1/hosts/{id}/heartbeat", name="host_heartbeat",
          summary="Host agent heartbeat", auth="host", status=204,
          message=lambda ctx: h.HostHeartbeat(actor=ctx.actor, host_id=_host(ctx))),
    Route(method="POST", path="/v1/hosts/auth/refresh", name="refresh_host_token",
          summary="Refresh host JWT", auth="public", request=s.RefreshHostTokenRequest,
          response=s.RefreshHostTokenResponse,
          message=lambda ctx: h.RefreshHostToken(refresh_token=ctx.body.refresh_token,
                                                 client=client_info()),
          reply=lambda reply: reply.body),
    Route(method="GET", path="/v1/hosts/{id}/delete-preview", name="get_host_delete_preview",
          summary="Preview host deletion", response=s.HostDeletePreview,
          message=lambda ctx: h.GetHostDeletePreview(actor=ctx.actor, host_id=_host(ctx)),
          reply=lambda reply: reply.body),
    Route(method="GET", path="/v1/hosts/{id}/tags", name="list_host_tags", summary="List host tags",
          response=list[str], message=lambda ctx: h.ListHostTags(actor=ctx.actor, host_id=_host(ctx)),
          reply=lambda reply: reply.tags),
    Route(method="POST", path="/v1/hosts/{id}/tags", name="add_host_tag",
          summary="Add a tag to a host", request=s.AddTagRequest, status=204,
          message=lambda ctx: h.AddHostTag(actor=ctx.actor, host_id=_host(ctx), tag=ctx.body.tag,
                                           client=client_info())),
    Route(method="DELETE", path="/v1/hosts/{id}/tags/{tag}", name="remove_host_tag",
          summary="Remove a tag from a host", status=204,
          message=lambda ctx: h.RemoveHostTag(actor=ctx.actor, host_id=_host(ctx),
                                              tag=_id(ctx.params["tag"], "tag"),
                                              client=client_info())),
]


def register(state: GatewayState) -> None:
    """Add the host routes (the table above)."""
    register_routes(state, HOSTS, ROUTES)
