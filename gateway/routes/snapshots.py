"""Pause/resume and snapshot templates: ``/v1/capsules/{id}/pause|resume``, ``/v1/snapshots*``,
``/v1/admin/templates*``.

Pause, resume and snapshot go to the host of the capsule (looked up first, as
the other capsule operations); listing goes to any vmmgr (templates are
records in vmmgr's schema); deleting goes to any vmmgr, which forwards to the
host holding the template's files.
"""

from __future__ import annotations

from quart import Response

from dovecote.bus.messages import capsules as c
from dovecote.gateway.calls import call, json_response, no_content, parse_body, parse_query
from dovecote.gateway.errors import ApiError
from dovecote.gateway.routes.capsules import capsule_op
from dovecote.gateway.schemas import capsules as s
from dovecote.gateway.state import GatewayState

SNAPSHOT_TIMEOUT_S = 300.0
MAX_NAME = 128


def register(state: GatewayState) -> None:
    """Add the pause/resume, snapshot and admin template routes."""
    api, app, edge = state.api, state.app, state.edge

    @api.route(app, "POST", "/v1/capsules/{id}/pause", summary="Pause a running capsule",
               tags=["capsules"], responses={202: s.Capsule})
    async def pause_capsule(id: str) -> Response:
        actor = await edge.authenticate()
        reply: c.CapsuleReply = await capsule_op(state, actor, c.PauseCapsule(actor=actor, capsule_id=id))
        return json_response(reply.capsule, 202)

    @api.route(app, "POST", "/v1/capsules/{id}/resume", summary="Resume a paused capsule",
               tags=["capsules"], responses={202: s.Capsule})
    async def resume_capsule(id: str) -> Response:
        actor = await edge.authenticate()
        reply: c.CapsuleReply = await capsule_op(state, actor, c.ResumeCapsule(actor=actor, capsule_id=id))
        return json_response(reply.capsule, 202)

    @api.route(app, "POST", "/v1/snapshots", summary="Create a snapshot template", tags=["snapshots"],
               request=s.CreateSnapshotRequest, responses={201: c.Template})
    async def create_snapshot() -> Response:
        actor = await edge.authenticate()
        body = await parse_body(s.CreateSnapshotRequest)
        reply: c.TemplateReply = await capsule_op(
            state, actor, c.CreateSnapshot(actor=actor, capsule_id=body.sandbox_id, name=body.name),
            timeout_s=SNAPSHOT_TIMEOUT_S)
        return json_response(reply.template, 201)

    @api.route(app, "GET", "/v1/snapshots", summary="List templates for your team", tags=["snapshots"],
               query=s.SnapshotListQuery, responses={200: list[c.Template]})
    async def list_snapshots() -> Response:
        actor = await edge.authenticate()
        query = parse_query(s.SnapshotListQuery)
        reply: c.TemplateList = await call(state, "vmmgr", c.ListTemplates(actor=actor,
                                                                           kind=query.type or ""))
        return json_response(reply.templates)

    @api.route(app, "DELETE", "/v1/snapshots/{name}", summary="Delete a snapshot template",
               tags=["snapshots"], responses={204: None})
    async def delete_snapshot(name: str) -> Response:
        actor = await edge.authenticate()
        if not name or len(name) > MAX_NAME:
            raise ApiError(404, "not_found", "template not found")
        await call(state, "vmmgr", c.DeleteTemplate(actor=actor, name=name), timeout_s=60.0)
        return no_content()

    platform_admin = edge.platform_admin

    @api.route(app, "POST", "/v1/admin/capsules/{id}/snapshot",
               summary="Create snapshot from any capsule (admin)", tags=["admin"],
               request=s.AdminSnapshotRequest, responses={201: c.Template})
    async def admin_snapshot_capsule(id: str) -> Response:
        actor = await platform_admin()
        body = await parse_body(s.AdminSnapshotRequest)
        reply: c.TemplateReply = await capsule_op(
            state, actor, c.CreateSnapshot(actor=actor, capsule_id=id, name=body.name, admin=True),
            timeout_s=SNAPSHOT_TIMEOUT_S)
        return json_response(reply.template, 201)

    @api.route(app, "GET", "/v1/admin/templates", summary="List all templates (admin)", tags=["admin"],
               responses={200: list[c.Template]})
    async def admin_list_templates() -> Response:
        actor = await platform_admin()
        reply: c.TemplateList = await call(state, "vmmgr",
                                           c.ListTemplates(actor=actor, all_teams=True))
        return json_response(reply.templates)

    @api.route(app, "DELETE", "/v1/admin/templates/{name}", summary="Delete a template (admin)",
               tags=["admin"], responses={204: None})
    async def admin_delete_template(name: str) -> Response:
        actor = await platform_admin()
        if not name or len(name) > MAX_NAME:
            raise ApiError(404, "not_found", "template not found")
        await call(state, "vmmgr", c.DeleteTemplate(actor=actor, name=name, admin=True), timeout_s=60.0)
        return no_content()
