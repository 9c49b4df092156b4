"""The recorder's routes: review bundles, storage reclaim, and the filesystem's signed downloads.

- ``GET /api/sessions/{id}/review/bundle``: the latest exported bundle of a
  session of the caller's team, with a presigned URL per file and one for a
  zip of it (S3: SigV4 presigned; filesystem: ``/v1/storage/...`` signed URLs).
  It works after the session is deleted: exported bundles are kept.
- ``POST /api/storage/reclaim`` ``{mode: report | apply}`` (platform admins):
  the recorder's reclaim report, or its application.
- ``GET /v1/storage/{key}``: the filesystem backend's presigned downloads
  (``?expires&sig``, checked against the storage's signing key): no other
  authentication, like an S3 presigned URL.

:func:`export_review` is what ``POST /api/sessions/{id}/review/export`` calls
once the desktops service has checked that the session exists and can export
(see docs/architecture.md, "Recorder and live view").
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import trio
from quart import Response, redirect, request

from dovecote.bus.messages import recorder as r
from dovecote.bus.messages.common import Principal
from dovecote.gateway.calls import call
from dovecote.gateway.errors import ApiError, Error
from dovecote.gateway.routing import Call, Family, Route, register_routes
from dovecote.gateway.state import GatewayState
from dovecote.libs.errors import NotFoundInStorage
from dovecote.libs.storage import FilesystemStorage, Storage, storage_from_env

SERVICE = "recorder"
EXPORT_TIMEOUT_S = 120.0


class ReclaimBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    mode: Literal["report", "apply"] = "report"


class ExportEnvelope(msgspec.Struct, kw_only=True):
    bundle: r.BundleRef
    review_recording: r.ReviewSummary


SessionId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]


def _subject(value: str) -> str:
    try:
        return msgspec.convert(value, SessionId)
    except msgspec.ValidationError:
        raise ApiError(404, "not_found", "session not found") from None


async def export_review(state: GatewayState, actor: Principal, session_id: str) -> ExportEnvelope:
    """Export a session's review bundle (the session was checked by its service)."""
    reply: r.ExportReply = await call(state, SERVICE, r.ExportBundle(
        subject_id=_subject(session_id), team_id=actor.team_id), timeout_s=EXPORT_TIMEOUT_S)
    return ExportEnvelope(bundle=reply.bundle, review_recording=reply.review_recording)


async def review_summary(state: GatewayState, session_id: str) -> r.ReviewSummary:
    """A session's ReviewRecordingSummary (``unavailable`` when nothing was recorded)."""
    try:
        reply: r.SummaryReply = await call(state, SERVICE, r.GetSummary(subject_id=_subject(session_id)))
    except ApiError as exc:
        if exc.status != 404:
            raise
        return r.ReviewSummary(mode="unavailable", status="unavailable",
                               retention="ephemeral_until_export",
                               reason="nothing was recorded for this session")
    return reply.summary


def _bundle(expires_s: int | None = None) -> Callable[[Call], r.GetBundle]:
    def build(ctx: Call) -> r.GetBundle:
        extra = {} if expires_s is None else {"expires_s": expires_s}
        return r.GetBundle(subject_id=_subject(ctx.params["id"]), team_id=ctx.actor.team_id, **extra)
    return build


RECORDER = Family(tags=["desktops"], service=SERVICE, timeout_s=EXPORT_TIMEOUT_S)

ROUTES = [
    Route(method="GET", path="/api/sessions/{id}/review/bundle", name="get_review_bundle",
          summary="The exported review bundle: presigned file URLs and a zip",
          response=r.BundleLinks, responses={404: Error}, message=_bundle()),
    Route(method="GET", path="/api/sessions/{id}/review/bundle.zip", name="get_review_bundle_zip",
          summary="Download the exported review bundle as a zip (a redirect)", status=302,
          responses={404: Error}, message=_bundle(expires_s=300),
          reply=lambda reply: redirect(reply.zip_url, 302)),
    Route(method="POST", path="/api/storage/reclaim", name="storage_reclaim",
          summary="Report or reclaim stale storage (admins)", auth="admin", request=ReclaimBody,
          response=r.ReclaimReport, responses={403: Error}, timeout_s=300.0,
          message=lambda ctx: r.Reclaim(mode=ctx.body.mode)),
]


def register(state: GatewayState) -> None:
    """Add the recorder's routes (and document them); the signed download is a stream."""
    api, app = state.api, state.app
    storage: Storage = storage_from_env(os.environ, Path(state.config.data_dir))

    register_routes(state, RECORDER, ROUTES)

    async def storage_download(key: str) -> Response:
        if not isinstance(storage, FilesystemStorage):
            raise ApiError(404, "not_found", "downloads are presigned by the object store")
        expires, sig = request.args.get("expires", ""), request.args.get("sig", "")
        fs = storage
        if not await trio.to_thread.run_sync(lambda: fs.verify_presigned(key, expires=expires, sig=sig)):
            raise ApiError(403, "invalid_signature", "the link is invalid or has expired")
        try:
            info = await storage.stat(key)
            opened = storage.open_read(key)
            chunks = await opened.__aenter__()
        except NotFoundInStorage:
            raise ApiError(404, "not_found", "no such object") from None

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await opened.__aexit__(None, None, None)

        return Response(body(), status=200, headers={"Content-Length": str(info.size),
                                                     "Cache-Control": "private, no-store"},
                        content_type="application/octet-stream")

    # Werkzeug's default converter stops at "/" and keys have several segments.
    api.stream(app, "GET", "/v1/storage/{key}", storage_download, rule="/v1/storage/<path:key>",
               summary="A presigned download (filesystem storage)", tags=["storage"],
               responses={200: None, 403: Error, 404: Error}, security=False)
