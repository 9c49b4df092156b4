"""``/v1/capsules*`` and ``/v1/admin/capsules*`` (capsules reference, tags capsules/admin).

Capsule routes take ``X-API-Key`` or the session cookie (with CSRF for
changes); the admin variants a platform admin's session. Creating and listing
go to ``vmmgr`` (any host). An operation on one capsule first asks ``vmmgr``
where the capsule runs (:class:`LookupCapsule`, scoped to the caller's team:
another team's capsule is 404), then sends the operation to
``vmmgr.<host_id>`` with what the lookup found (``found``): the host checks
the status (409 when the capsule is not running) without reading the row again.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec
from quart import Response, request

from dovecote.bus.messages import capsules as c
from dovecote.bus.messages.common import Principal
from dovecote.gateway.calls import call, json_response
from dovecote.gateway.errors import ApiError, Error
from dovecote.gateway.routing import Call, Family, Route, path_id, register_routes
from dovecote.gateway.schemas import capsules as s
from dovecote.gateway.state import GatewayState

MAX_ID = 64
LOOKUP_TIMEOUT_S = 10.0
OP_TIMEOUT_S = 30.0
EXEC_GRACE_S = 20.0
FILE_TIMEOUT_S = 120.0


def _id(value: str) -> str:
    return path_id(value, ApiError(404, "not_found", "capsule not found"))


async def capsule_op(state: GatewayState, actor: Principal, message: c.CapsuleOp,
                     timeout_s: float = 30.0) -> Any:
    """Send an operation on one capsule to the vmmgr that runs it (404 if the caller may not see it).

    The lookup's answer goes along (``found``): the host's agent operations do not read the row again.
    """
    reply: c.CapsuleReply = await call(state, "vmmgr", c.LookupCapsule(
        actor=actor, capsule_id=_id(message.capsule_id), admin=message.admin, operation=True))
    message = msgspec.structs.replace(message, found=reply)
    return await call(state, f"vmmgr.{reply.host_id}", message, timeout_s=timeout_s)


CREATE_UNAVAILABLE = ("vm_driver_disabled: this installation runs no VMs; otherwise no host can "
                      "take the capsule right now (e.g. no_host_available, host_full, image_not_ready, "
                      "service_unavailable): retry later")


class Upload(NamedTuple):
    """A ``files/write`` form: the path and the file's bytes."""

    path: str
    data: bytes


async def _upload_form(form_type: Any) -> Upload:
    """The ``multipart/form-data`` fields of :class:`~s.UploadForm`, or 415/400."""
    if request.mimetype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       "the body must be multipart/form-data with path and file")
    form = await request.form
    files = await request.files
    path, upload = form.get("path"), files.get("file")
    if not path or upload is None:
        raise ApiError(400, "invalid_request", "path and file are required")
    return Upload(path=path, data=upload.read())


async def send_to_host(ctx: Call, message: c.CapsuleOp, timeout_s: float) -> Any:
    """A route table `send`: the operation goes to the vmmgr that runs the capsule."""
    return await capsule_op(ctx.state, ctx.actor, message, timeout_s)


def _routes(base: str, admin: bool) -> list[Route]:
    """The capsule operations on one surface (``/v1/capsules`` or its admin twin)."""
    suffix = " (admin)" if admin else ""
    name = "admin_" if admin else ""

    def target(call: Call) -> dict[str, Any]:
        return {"actor": call.actor, "capsule_id": _id(call.params["id"]), "admin": admin}

    created = 201 if admin else 202
    routes = [
        Route(method="POST", path=base, name=name + "create_capsule", summary="Create a capsule" + suffix,
              request=s.CreateCapsuleRequest, response=s.Capsule, status=created,
              responses={503: Error}, descriptions={503: CREATE_UNAVAILABLE},
              message=lambda call: c.CreateCapsule(actor=call.actor, spec=c.CapsuleSpec(
                  template=call.body.template, vcpus=call.body.vcpus,
                  memory_mb=call.body.memory_mb, disk_size_mb=call.body.disk_size_mb,
                  timeout_sec=call.body.timeout_sec, metadata=call.body.metadata)),
              reply=lambda reply: reply.capsule),
        Route(method="GET", path=base, name=name + "list_capsules", summary="List capsules" + suffix,
              response=list[s.Capsule],
              message=lambda call: c.ListCapsules(actor=call.actor, all_teams=admin),
              reply=lambda reply: reply.capsules),
        Route(method="GET", path=base + "/{id}", name=name + "get_capsule",
              summary="Get capsule details" + suffix, response=s.Capsule,
              message=lambda call: c.LookupCapsule(actor=call.actor, capsule_id=_id(call.params["id"]),
                                                   admin=admin),
              reply=lambda reply: reply.capsule),
        Route(method="DELETE", path=base + "/{id}", name=name + "destroy_capsule",
              summary="Destroy a capsule" + suffix, send=send_to_host, timeout_s=OP_TIMEOUT_S,
              **({"status": 204} if admin else {"status": 202, "response": s.Capsule,
                                                 "reply": lambda reply: reply.capsule}),
              message=lambda call: c.DestroyCapsule(**target(call))),
        Route(method="POST", path=base + "/{id}/exec", name=name + "exec_command",
              summary="Execute a command" + suffix, request=s.ExecRequest, response=s.ExecResponse,
              responses={202: s.BackgroundExecResponse}, send=send_to_host,
              message=lambda call: c.ExecCommand(
                  **target(call), cmd=call.body.cmd, args=call.body.args,
                  timeout_sec=call.body.timeout_sec, background=call.body.background,
                  tag=call.body.tag, envs=call.body.envs, cwd=call.body.cwd, user=call.body.user),
              timeout_s=lambda call: call.body.timeout_sec + EXEC_GRACE_S,
              reply=lambda reply: json_response(reply.started, 202) if reply.started is not None
              else reply.result),
        Route(method="GET", path=base + "/{id}/processes", name=name + "list_processes",
              summary="List running processes" + suffix, response=s.ProcessListResponse, send=send_to_host,
              timeout_s=OP_TIMEOUT_S,
              message=lambda call: c.ListProcesses(**target(call)), reply=lambda reply: reply.body),
        Route(method="DELETE", path=base + "/{id}/processes/{selector}", name=name + "kill_process",
              summary="Kill a process" + suffix, query=s.KillQuery, status=204, send=send_to_host,
              timeout_s=OP_TIMEOUT_S,
              message=lambda call: c.KillProcess(**target(call), selector=call.params["selector"],
                                                 signal=call.query.signal)),
        Route(method="POST", path=base + "/{id}/files/write", name=name + "upload_file",
              summary="Upload a file" + suffix, request=s.UploadForm, parse=_upload_form,
              request_content="multipart/form-data", status=204, send=send_to_host,
              timeout_s=FILE_TIMEOUT_S,
              message=lambda call: c.WriteFile(**target(call), path=call.body.path,
                                               data=call.body.data)),
        Route(method="POST", path=base + "/{id}/files/read", name=name + "download_file",
              summary="Download a file" + suffix, request=s.ReadFileRequest, send=send_to_host,
              timeout_s=FILE_TIMEOUT_S,
              message=lambda call: c.ReadFile(**target(call), path=call.body.path),
              reply=lambda reply: Response(reply.data, status=200,
                                           content_type="application/octet-stream")),
        Route(method="POST", path=base + "/{id}/files/list", name=name + "list_dir",
              summary="List directory contents" + suffix, request=s.ListDirRequest,
              response=s.ListDirResponse, send=send_to_host, timeout_s=OP_TIMEOUT_S,
              message=lambda call: c.ListDir(**target(call), path=call.body.path, depth=call.body.depth),
              reply=lambda reply: reply.body),
        Route(method="POST", path=base + "/{id}/files/mkdir", name=name + "make_dir",
              summary="Create a directory" + suffix, request=s.MakeDirRequest,
              response=s.MakeDirResponse, send=send_to_host, timeout_s=OP_TIMEOUT_S,
              message=lambda call: c.MakeDir(**target(call), path=call.body.path),
              reply=lambda reply: reply.body),
        Route(method="POST", path=base + "/{id}/files/remove", name=name + "remove_path",
              summary="Remove a file or directory" + suffix, request=s.RemoveRequest, status=204,
              send=send_to_host, timeout_s=OP_TIMEOUT_S,
              message=lambda call: c.RemovePath(**target(call), path=call.body.path)),
    ]
    if not admin:  # the reference has no admin ping
        routes.append(Route(
            method="POST", path=base + "/{id}/ping", name="ping_capsule",
            summary="Reset capsule inactivity timer", status=204, send=send_to_host,
            timeout_s=OP_TIMEOUT_S,
            message=lambda call: c.PingCapsule(actor=call.actor, capsule_id=_id(call.params["id"]))))
    return routes


CAPSULES = Family(tags=["capsules"], service="vmmgr", timeout_s=LOOKUP_TIMEOUT_S)
ADMIN = Family(tags=["admin"], service="vmmgr", auth="admin", timeout_s=LOOKUP_TIMEOUT_S)
"""Creating, listing and getting ask ``vmmgr``; an operation on one capsule (``send=send_to_host``) goes
to the vmmgr that runs it."""


def register(state: GatewayState) -> None:
    """Add the capsule routes and their admin variants: each operation declared once for both."""
    register_routes(state, CAPSULES, _routes("/v1/capsules", admin=False))
    register_routes(state, ADMIN, _routes("/v1/admin/capsules", admin=True))
