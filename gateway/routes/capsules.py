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

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from quart import Response, request

from dovecote.bus.messages import capsules as c
from dovecote.bus.messages.common import Principal
from dovecote.gateway.calls import call, json_response, no_content, parse_body, parse_query
from dovecote.gateway.errors import ApiError, Error
from dovecote.gateway.schemas import capsules as s
from dovecote.gateway.state import GatewayState

MAX_ID = 64
EXEC_GRACE_S = 20.0
FILE_TIMEOUT_S = 120.0


def _id(value: str) -> str:
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise ApiError(404, "not_found", "capsule not found")
    return value


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


def register(state: GatewayState) -> None:
    """Add the capsule routes and their admin variants."""
    api, app, edge = state.api, state.app, state.edge

    platform_admin = edge.platform_admin

    async def op(actor: Principal, message: c.CapsuleOp, timeout_s: float = 30.0) -> Any:
        return await capsule_op(state, actor, message, timeout_s)

    # Each operation is declared once and registered for both surfaces.
    Auth = Callable[[], Awaitable[Principal]]
    surfaces: list[tuple[str, list[str], Auth, bool]] = [
        ("/v1/capsules", ["capsules"], edge.authenticate, False),
        ("/v1/admin/capsules", ["admin"], platform_admin, True),
    ]

    for base, tags, authenticate, admin in surfaces:
        suffix = " (admin)" if admin else ""

        def bind(base: str = base, tags: list[str] = tags, authenticate: Auth = authenticate,
                 admin: bool = admin, suffix: str = suffix) -> None:
            name = "admin_" if admin else ""

            async def create() -> Response:
                actor = await authenticate()
                body = await parse_body(s.CreateCapsuleRequest)
                spec = c.CapsuleSpec(template=body.template, vcpus=body.vcpus,
                                     memory_mb=body.memory_mb, disk_size_mb=body.disk_size_mb,
                                     timeout_sec=body.timeout_sec, metadata=body.metadata)
                reply: c.CapsuleReply = await call(state, "vmmgr",
                                                   c.CreateCapsule(actor=actor, spec=spec))
                return json_response(reply.capsule, 201 if admin else 202)

            create.__name__ = name + "create_capsule"
            api.route(app, "POST", base, summary="Create a capsule" + suffix, tags=tags,
                      request=s.CreateCapsuleRequest,
                      responses={201 if admin else 202: s.Capsule, 503: Error},
                      descriptions={503: CREATE_UNAVAILABLE})(create)

            async def list_capsules() -> Response:
                actor = await authenticate()
                reply: c.CapsuleList = await call(state, "vmmgr",
                                                  c.ListCapsules(actor=actor, all_teams=admin))
                return json_response(reply.capsules)

            list_capsules.__name__ = name + "list_capsules"
            api.route(app, "GET", base, summary="List capsules" + suffix, tags=tags,
                      responses={200: list[s.Capsule]})(list_capsules)

            async def get_capsule(id: str) -> Response:
                actor = await authenticate()
                reply: c.CapsuleReply = await call(state, "vmmgr", c.LookupCapsule(
                    actor=actor, capsule_id=_id(id), admin=admin))
                return json_response(reply.capsule)

            get_capsule.__name__ = name + "get_capsule"
            api.route(app, "GET", base + "/{id}", summary="Get capsule details" + suffix,
                      tags=tags, responses={200: s.Capsule})(get_capsule)

            async def destroy_capsule(id: str) -> Response:
                actor = await authenticate()
                reply: c.CapsuleReply = await op(actor, c.DestroyCapsule(
                    actor=actor, capsule_id=_id(id), admin=admin))
                return no_content() if admin else json_response(reply.capsule, 202)

            destroy_capsule.__name__ = name + "destroy_capsule"
            api.route(app, "DELETE", base + "/{id}", summary="Destroy a capsule" + suffix,
                      tags=tags, responses={204: None} if admin else {202: s.Capsule})(destroy_capsule)

            async def exec_command(id: str) -> Response:
                actor = await authenticate()
                body = await parse_body(s.ExecRequest)
                reply: c.ExecReply = await op(actor, c.ExecCommand(
                    actor=actor, capsule_id=_id(id), admin=admin, cmd=body.cmd, args=body.args,
                    timeout_sec=body.timeout_sec, background=body.background, tag=body.tag,
                    envs=body.envs, cwd=body.cwd, user=body.user),
                    timeout_s=body.timeout_sec + EXEC_GRACE_S)
                if reply.started is not None:
                    return json_response(reply.started, 202)
                return json_response(reply.result)

            exec_command.__name__ = name + "exec_command"
            api.route(app, "POST", base + "/{id}/exec", summary="Execute a command" + suffix,
                      tags=tags, request=s.ExecRequest,
                      responses={200: s.ExecResponse, 202: s.BackgroundExecResponse})(exec_command)

            async def list_processes(id: str) -> Response:
                actor = await authenticate()
                reply: c.ProcessesReply = await op(actor, c.ListProcesses(
                    actor=actor, capsule_id=_id(id), admin=admin))
                return json_response(reply.body)

            list_processes.__name__ = name + "list_processes"
            api.route(app, "GET", base + "/{id}/processes", summary="List running processes" + suffix,
                      tags=tags, responses={200: s.ProcessListResponse})(list_processes)

            async def kill_process(id: str, selector: str) -> Response:
                actor = await authenticate()
                query = parse_query(s.KillQuery)
                await op(actor, c.KillProcess(actor=actor, capsule_id=_id(id), admin=admin,
                                              selector=selector, signal=query.signal))
                return no_content()

            kill_process.__name__ = name + "kill_process"
            api.route(app, "DELETE", base + "/{id}/processes/{selector}",
                      summary="Kill a process" + suffix, tags=tags, query=s.KillQuery,
                      responses={204: None})(kill_process)

            async def write_file(id: str) -> Response:
                actor = await authenticate()
                if request.mimetype != "multipart/form-data":
                    raise ApiError(415, "unsupported_media_type",
                                   "the body must be multipart/form-data with path and file")
                form = await request.form
                files = await request.files
                path, upload = form.get("path"), files.get("file")
                if not path or upload is None:
                    raise ApiError(400, "invalid_request", "path and file are required")
                data = upload.read()
                await op(actor, c.WriteFile(actor=actor, capsule_id=_id(id), admin=admin,
                                            path=path, data=data), timeout_s=FILE_TIMEOUT_S)
                return no_content()

            write_file.__name__ = name + "upload_file"
            api.route(app, "POST", base + "/{id}/files/write", summary="Upload a file" + suffix,
                      tags=tags, request=s.UploadForm, request_content="multipart/form-data",
                      responses={204: None})(write_file)

            async def read_file(id: str) -> Response:
                actor = await authenticate()
                body = await parse_body(s.ReadFileRequest)
                reply: c.FileContent = await op(actor, c.ReadFile(
                    actor=actor, capsule_id=_id(id), admin=admin, path=body.path),
                    timeout_s=FILE_TIMEOUT_S)
                return Response(reply.data, status=200, content_type="application/octet-stream")

            read_file.__name__ = name + "download_file"
            api.route(app, "POST", base + "/{id}/files/read", summary="Download a file" + suffix,
                      tags=tags, request=s.ReadFileRequest, responses={200: None})(read_file)

            async def list_dir(id: str) -> Response:
                actor = await authenticate()
                body = await parse_body(s.ListDirRequest)
                reply: c.ListDirReply = await op(actor, c.ListDir(
                    actor=actor, capsule_id=_id(id), admin=admin, path=body.path, depth=body.depth))
                return json_response(reply.body)

            list_dir.__name__ = name + "list_dir"
            api.route(app, "POST", base + "/{id}/files/list", summary="List directory contents" + suffix,
                      tags=tags, request=s.ListDirRequest,
                      responses={200: s.ListDirResponse})(list_dir)

            async def make_dir(id: str) -> Response:
                actor = await authenticate()
                body = await parse_body(s.MakeDirRequest)
                reply: c.MakeDirReply = await op(actor, c.MakeDir(
                    actor=actor, capsule_id=_id(id), admin=admin, path=body.path))
                return json_response(reply.body)

            make_dir.__name__ = name + "make_dir"
            api.route(app, "POST", base + "/{id}/files/mkdir", summary="Create a directory" + suffix,
                      tags=tags, request=s.MakeDirRequest,
                      responses={200: s.MakeDirResponse})(make_dir)

            async def remove_path(id: str) -> Response:
                actor = await authenticate()
                body = await parse_body(s.RemoveRequest)
                await op(actor, c.RemovePath(actor=actor, capsule_id=_id(id), admin=admin,
                                             path=body.path))
                return no_content()

            remove_path.__name__ = name + "remove_path"
            api.route(app, "POST", base + "/{id}/files/remove",
                      summary="Remove a file or directory" + suffix, tags=tags,
                      request=s.RemoveRequest, responses={204: None})(remove_path)

            if not admin:  # the reference has no admin ping
                async def ping_capsule(id: str) -> Response:
                    actor = await authenticate()
                    await op(actor, c.PingCapsule(actor=actor, capsule_id=_id(id)))
                    return no_content()

                api.route(app, "POST", base + "/{id}/ping",
                          summary="Reset capsule inactivity timer", tags=tags,
                          responses={204: None})(ping_capsule)

        bind()
