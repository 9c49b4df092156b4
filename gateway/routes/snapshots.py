"""Pause/resume and snapshot templates: ``/v1/capsules/{id}/pause|resume``, ``/v1/snapshots*``,
``/v1/admin/templates*``.

Pause, resume and snapshot go to the host of the capsule (looked up first, as
the other capsule operations); listing goes to any vmmgr (templates are
records in vmmgr's schema); deleting goes to any vmmgr, which forwards to the
host holding the template's files.
"""

from __future__ import annotations

from dovecote.bus.messages import capsules as c
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routes.capsules import OP_TIMEOUT_S, send_to_host
from dovecote.gateway.routing import Call, Family, Route, register_routes
from dovecote.gateway.schemas import capsules as s
from dovecote.gateway.state import GatewayState

SNAPSHOT_TIMEOUT_S = 300.0
DELETE_TIMEOUT_S = 60.0
MAX_NAME = 128


def _template(ctx: Call) -> str:
    name = ctx.params["name"]
    if not name or len(name) > MAX_NAME:
        raise ApiError(404, "not_found", "template not found")
    return name


SNAPSHOTS = Family(tags=["snapshots"], service="vmmgr")

ROUTES = [
    Route(method="POST", path="/v1/capsules/{id}/pause", name="pause_capsule",
          summary="Pause a running capsule", tags=["capsules"], response=s.Capsule, status=202,
          send=send_to_host, timeout_s=OP_TIMEOUT_S,
          message=lambda ctx: c.PauseCapsule(actor=ctx.actor, capsule_id=ctx.params["id"]),
          reply=lambda reply: reply.capsule),
    Route(method="POST", path="/v1/capsules/{id}/resume", name="resume_capsule",
          summary="Resume a paused capsule", tags=["capsules"], response=s.Capsule, status=202,
          send=send_to_host, timeout_s=OP_TIMEOUT_S,
          message=lambda ctx: c.ResumeCapsule(actor=ctx.actor, capsule_id=ctx.params["id"]),
          reply=lambda reply: reply.capsule),
    Route(method="POST", path="/v1/snapshots", name="create_snapshot",
          summary="Create a snapshot template", request=s.CreateSnapshotRequest, response=c.Template,
          status=201, send=send_to_host, timeout_s=SNAPSHOT_TIMEOUT_S,
          message=lambda ctx: c.CreateSnapshot(actor=ctx.actor, capsule_id=ctx.body.sandbox_id,
                                               name=ctx.body.name),
          reply=lambda reply: reply.template),
    Route(method="GET", path="/v1/snapshots", name="list_snapshots",
          summary="List templates for your team", query=s.SnapshotListQuery,
          response=list[c.Template],
          message=lambda ctx: c.ListTemplates(actor=ctx.actor, kind=ctx.query.type or ""),
          reply=lambda reply: reply.templates),
    Route(method="DELETE", path="/v1/snapshots/{name}", name="delete_snapshot",
          summary="Delete a snapshot template", status=204, timeout_s=DELETE_TIMEOUT_S,
          message=lambda ctx: c.DeleteTemplate(actor=ctx.actor, name=_template(ctx))),
    Route(method="POST", path="/v1/admin/capsules/{id}/snapshot", name="admin_snapshot_capsule",
          summary="Create snapshot from any capsule (admin)", tags=["admin"], auth="admin",
          request=s.AdminSnapshotRequest, response=c.Template, status=201, send=send_to_host,
          timeout_s=SNAPSHOT_TIMEOUT_S,
          message=lambda ctx: c.CreateSnapshot(actor=ctx.actor, capsule_id=ctx.params["id"],
                                               name=ctx.body.name, admin=True),
          reply=lambda reply: reply.template),
    Route(method="GET", path="/v1/admin/templates", name="admin_list_templates",
          summary="List all templates (admin)", tags=["admin"], auth="admin",
          response=list[c.Template],
          message=lambda ctx: c.ListTemplates(actor=ctx.actor, all_teams=True),
          reply=lambda reply: reply.templates),
    Route(method="DELETE", path="/v1/admin/templates/{name}", name="admin_delete_template",
          summary="Delete a template (admin)", tags=["admin"], auth="admin", status=204,
          timeout_s=DELETE_TIMEOUT_S,
          message=lambda ctx: c.DeleteTemplate(actor=ctx.actor, name=_template(ctx), admin=True)),
]


def register(state: GatewayState) -> None:
    """Add the pause/resume, snapshot and admin template routes (the table above)."""
    register_routes(state, SNAPSHOTS, ROUTES)
