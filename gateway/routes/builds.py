"""Template builds (``/v1/admin/builds*``, platform admins with a session).

A build boots a capsule from ``base_template``, runs ``steps`` in order and
snapshots the result into the platform template ``name``
(:mod:`dovecote.vmmgr.builds`). The reference leaves the bodies open; ours are
:class:`~dovecote.gateway.schemas.capsules.CreateBuildRequest` and
:class:`~dovecote.bus.messages.builds.Build`.
"""

from __future__ import annotations

from quart import Response

from dovecote.bus.messages import builds as b
from dovecote.gateway.calls import call, json_response, no_content, parse_body
from dovecote.gateway.errors import ApiError
from dovecote.gateway.schemas import capsules as s
from dovecote.gateway.state import GatewayState


def register(state: GatewayState) -> None:
    """Add the admin build routes."""
    api, app, edge = state.api, state.app, state.edge

    platform_admin = edge.platform_admin

    def _id(value: str) -> str:
        if not value or len(value) > 64 or not value.isprintable():
            raise ApiError(404, "not_found", "build not found")
        return value

    @api.route(app, "POST", "/v1/admin/builds", summary="Submit a template build (admin)",
               tags=["admin"], request=s.CreateBuildRequest, responses={202: b.Build})
    async def admin_create_build() -> Response:
        actor = await platform_admin()
        body = await parse_body(s.CreateBuildRequest)
        reply: b.BuildReply = await call(state, "vmmgr", b.SubmitBuild(
            actor=actor, name=body.name, base_template=body.base_template, steps=body.steps,
            step_timeout_sec=body.step_timeout_sec))
        return json_response(reply.build, 202)

    @api.route(app, "GET", "/v1/admin/builds", summary="List builds (admin)", tags=["admin"],
               responses={200: list[b.Build]})
    async def admin_list_builds() -> Response:
        actor = await platform_admin()
        reply: b.BuildList = await call(state, "vmmgr", b.ListBuilds(actor=actor))
        return json_response(reply.builds)

    @api.route(app, "GET", "/v1/admin/builds/{id}", summary="Get build detail (admin)", tags=["admin"],
               responses={200: b.Build})
    async def admin_get_build(id: str) -> Response:
        actor = await platform_admin()
        reply: b.BuildReply = await call(state, "vmmgr", b.GetBuild(actor=actor, build_id=_id(id)))
        return json_response(reply.build)

    @api.route(app, "POST", "/v1/admin/builds/{id}/cancel", summary="Cancel a build (admin)",
               tags=["admin"], responses={204: None})
    async def admin_cancel_build(id: str) -> Response:
        actor = await platform_admin()
        await call(state, "vmmgr", b.CancelBuild(actor=actor, build_id=_id(id)))
        return no_content()
