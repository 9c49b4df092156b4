"""Template builds (``/v1/admin/builds*``, platform admins with a session).

A build boots a capsule from ``base_template``, runs ``steps`` in order and
snapshots the result into the platform template ``name``
(:mod:`dovecote.vmmgr.builds`). The reference leaves the bodies open; ours are
:class:`~dovecote.gateway.schemas.capsules.CreateBuildRequest` and
:class:`~dovecote.bus.messages.builds.Build`.
"""

from __future__ import annotations

from dovecote.bus.messages import builds as b
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routing import Call, Family, Route, path_id, register_routes
from dovecote.gateway.schemas import capsules as s
from dovecote.gateway.state import GatewayState


def _id(ctx: Call) -> str:
    value = ctx.params["id"]
    return path_id(value, ApiError(404, "not_found", "build not found"))


BUILDS = Family(tags=["admin"], service="vmmgr", auth="admin")

ROUTES = [
    Route(method="POST", path="/v1/admin/builds", name="admin_create_build",
          summary="Submit a template build (admin)", request=s.CreateBuildRequest, response=b.Build,
          status=202,
          message=lambda ctx: b.SubmitBuild(
              actor=ctx.actor, name=ctx.body.name, base_template=ctx.body.base_template,
              steps=ctx.body.steps, step_timeout_sec=ctx.body.step_timeout_sec),
          reply=lambda reply: reply.build),
    Route(method="GET", path="/v1/admin/builds", name="admin_list_builds", summary="List builds (admin)",
          response=list[b.Build], message=lambda ctx: b.ListBuilds(actor=ctx.actor),
          reply=lambda reply: reply.builds),
    Route(method="GET", path="/v1/admin/builds/{id}", name="admin_get_build",
          summary="Get build detail (admin)", response=b.Build,
          message=lambda ctx: b.GetBuild(actor=ctx.actor, build_id=_id(ctx)),
          reply=lambda reply: reply.build),
    Route(method="POST", path="/v1/admin/builds/{id}/cancel", name="admin_cancel_build",
          summary="Cancel a build (admin)", status=204,
          message=lambda ctx: b.CancelBuild(actor=ctx.actor, build_id=_id(ctx))),
]


def register(state: GatewayState) -> None:
    """Add the admin build routes (the table above)."""
    register_routes(state, BUILDS, ROUTES)
