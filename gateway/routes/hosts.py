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
from dovecote.bus.messages.common import Principal
from dovecote.gateway.calls import call, client_info, json_response, no_content, parse_body
from dovecote.gateway.errors import ApiError
from dovecote.gateway.schemas import hosts as s
from dovecote.gateway.state import GatewayState

MAX_ID = 64
TRUE, FALSE = {"true", "1"}, {"false", "0", ""}


def _id(value: str, what: str = "host id") -> str:
    """A path identifier, or 400."""
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise ApiError(400, "invalid_request", f"invalid {what}")
    return value


def _force() -> bool:
    """The ``force`` query parameter (true/false/1/0), or 400."""
    raw = request.args.get("force", "").strip().lower()
    if raw not in TRUE | FALSE:
        raise ApiError(400, "invalid_request", "force must be true or false")
    return raw in TRUE


def register(state: GatewayState) -> None:
    """Add the host routes."""
    api, app, edge = state.api, state.app, state.edge

    async def session() -> Principal:
        actor: Principal = await edge.authenticate(session_only=True)
        return actor

    @api.route(app, "POST", "/v1/hosts", summary="Create a host", tags=["hosts"],
               request=s.CreateHostRequest, responses={201: s.CreateHostResponse})
    async def create_host() -> Response:
        actor = await session()
        body = await parse_body(s.CreateHostRequest)
        reply = await call(state, "auth", h.CreateHost(
            actor=actor, host_type=body.type, team_id=body.team_id, provider=body.provider,
            availability_zone=body.availability_zone, client=client_info()))
        return json_response(reply.body, 201)

    @api.route(app, "GET", "/v1/hosts", summary="List hosts", tags=["hosts"],
               responses={200: list[s.Host]})
    async def list_hosts() -> Response:
        reply = await call(state, "auth", h.ListHosts(actor=await session()))
        return json_response(reply.hosts)

    @api.route(app, "GET", "/v1/hosts/{id}", summary="Get host details", tags=["hosts"],
               responses={200: s.Host})
    async def get_host(id: str) -> Response:
        reply = await call(state, "auth", h.GetHost(actor=await session(), host_id=_id(id)))
        return json_response(reply.body)

    @api.route(app, "DELETE", "/v1/hosts/{id}", summary="Delete a host", tags=["hosts"],
               responses={204: None, 409: s.HostHasCapsulesError}, query=s.DeleteHostQuery)
    async def delete_host(id: str) -> Response:
        actor = await session()
        force = _force()
        # A forced delete waits for vmmgr to destroy the host's capsules.
        reply = await call(state, "auth", h.DeleteHost(actor=actor, host_id=_id(id), force=force,
                                                       client=client_info()), timeout_s=90)
        if isinstance(reply, h.HostDeleteBlocked):
            return json_response(s.HostHasCapsulesError(error=s.HostHasCapsulesErrorBody(
                code="host_has_sandboxes", message=reply.message,
                sandbox_ids=reply.sandbox_ids)), 409)
        return no_content()

    @api.route(app, "POST", "/v1/hosts/{id}/token", summary="Regenerate registration token",
               tags=["hosts"], responses={201: s.CreateHostResponse})
    async def regenerate_host_token(id: str) -> Response:
        actor = await session()
        reply = await call(state, "auth", h.RegenerateHostToken(actor=actor, host_id=_id(id),
                                                                client=client_info()))
        return json_response(reply.body, 201)

    @api.route(app, "POST", "/v1/hosts/register", summary="Register a host agent",
               tags=["hosts"], request=s.RegisterHostRequest,
               responses={201: s.RegisterHostResponse}, security=False)
    async def register_host() -> Response:
        body = await parse_body(s.RegisterHostRequest)
        specs = h.HostSpecs(arch=body.arch, cpu_cores=body.cpu_cores, memory_mb=body.memory_mb,
                            disk_gb=body.disk_gb, address=body.address)
        reply = await call(state, "auth", h.RegisterHost(token=body.token, specs=specs,
                                                         client=client_info()))
        return json_response(reply.body, 201)

    @api.route(app, "POST", "/v1/hosts/{id}/heartbeat", summary="Host agent heartbeat",
               tags=["hosts"], responses={204: None})
    async def host_heartbeat(id: str) -> Response:
        actor = await edge.authenticate_host()
        await call(state, "auth", h.HostHeartbeat(actor=actor, host_id=_id(id)))
        return no_content()

    @api.route(app, "POST", "/v1/hosts/auth/refresh", summary="Refresh host JWT", tags=["hosts"],
               request=s.RefreshHostTokenRequest, responses={200: s.RefreshHostTokenResponse},
               security=False)
    async def refresh_host_token() -> Response:
        body = await parse_body(s.RefreshHostTokenRequest)
        reply = await call(state, "auth", h.RefreshHostToken(refresh_token=body.refresh_token,
                                                             client=client_info()))
        return json_response(reply.body)

    @api.route(app, "GET", "/v1/hosts/{id}/delete-preview", summary="Preview host deletion",
               tags=["hosts"], responses={200: s.HostDeletePreview})
    async def get_host_delete_preview(id: str) -> Response:
        reply = await call(state, "auth", h.GetHostDeletePreview(actor=await session(),
                                                                 host_id=_id(id)))
        return json_response(reply.body)

    @api.route(app, "GET", "/v1/hosts/{id}/tags", summary="List host tags", tags=["hosts"],
               responses={200: list[str]})
    async def list_host_tags(id: str) -> Response:
        reply = await call(state, "auth", h.ListHostTags(actor=await session(), host_id=_id(id)))
        return json_response(reply.tags)

    @api.route(app, "POST", "/v1/hosts/{id}/tags", summary="Add a tag to a host", tags=["hosts"],
               request=s.AddTagRequest, responses={204: None})
    async def add_host_tag(id: str) -> Response:
        actor = await session()
        body = await parse_body(s.AddTagRequest)
        await call(state, "auth", h.AddHostTag(actor=actor, host_id=_id(id), tag=body.tag,
                                               client=client_info()))
        return no_content()

    @api.route(app, "DELETE", "/v1/hosts/{id}/tags/{tag}", summary="Remove a tag from a host",
               tags=["hosts"], responses={204: None})
    async def remove_host_tag(id: str, tag: str) -> Response:
        actor = await session()
        await call(state, "auth", h.RemoveHostTag(actor=actor, host_id=_id(id),
                                                  tag=_id(tag, "tag"), client=client_info()))
        return no_content()
