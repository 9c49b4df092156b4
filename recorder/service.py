"""The recorder service: review bundles (timeline and deduplicated screenshots) and artifacts.

This is the service's process entry: ``dovecote recorder`` runs :data:`SPEC`.
It answers :data:`~dovecote.bus.messages.recorder.RecorderRequest` (handlers in
:mod:`.evidence`) and owns the storage (``libs/storage.py``: the filesystem
under ``<data_dir>/storage``, or S3 when ``S3_ENDPOINT_URL``/``S3_BUCKET`` is set).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec
import trio

from dovecote.libs.config import BaseConfig
from dovecote.libs.runtime import ServiceContext, ServiceSpec
from dovecote.libs.storage import storage_from_env
from dovecote.recorder.evidence import Recorder, RecorderSettings


class RecorderConfig(BaseConfig, kw_only=True):
    """Settings of the recorder service (``DOVECOTE_*`` variables)."""

    recorder_postmortem_hours: Annotated[float, msgspec.Meta(gt=0, le=24 * 365)] = 72.0
    """How long a failed session's evidence is pinned (``temporary_postmortem_pin``)."""
    recorder_active_window_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    """A subject that captured something this recently is ``active``, else ``idle``."""
    recorder_reclaim_stale_s: Annotated[float, msgspec.Meta(ge=0)] = 24 * 3600.0
    """Directories younger than this are never reclaim candidates."""
    recorder_reclaim_images: bool = True
    """Old guest images in the image cache are candidates (off for a cache shared by installations)."""
    recorder_orphan_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 600.0
    """A stored blob with no record is an orphan only after this long (a write may be in flight)."""
    vm_image_dir: str = ""
    """vmmgr's guest image cache (the same ``DOVECOTE_VM_IMAGE_DIR``; default as vmmgr's)."""
    desktop_xvfb_root: str = "/var/tmp/dovecote/desktops"
    """The desktops service's xvfb runtime root (the same variable)."""


def image_dir_of(config: RecorderConfig) -> str:
    """vmmgr's default image cache, when the variable is not set (see vmmgr/service.py)."""
    if config.vm_image_dir:
        return config.vm_image_dir
    if os.geteuid() == 0:
        return "/var/tmp/dovecote/images"
    return str(Path.home() / ".cache" / "dovecote" / "images")


async def main(ctx: ServiceContext[RecorderConfig], *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer the recorder's messages until stopped."""
    assert ctx.db is not None
    config = ctx.config
    storage = storage_from_env(os.environ, Path(config.data_dir))
    settings = RecorderSettings(
        data_dir=config.data_dir, postmortem_s=config.recorder_postmortem_hours * 3600.0,
        active_window_s=config.recorder_active_window_s, image_dir=image_dir_of(config),
        xvfb_root=config.desktop_xvfb_root, stale_s=config.recorder_reclaim_stale_s,
        reclaim_images=config.recorder_reclaim_images,
        orphan_grace_s=config.recorder_orphan_grace_s)
    recorder = Recorder(ctx.db, storage, settings)
    recorder.register(ctx.handle)
    ctx.health_details["storage"] = type(storage).__name__
    task_status.started()
    try:
        await ctx.stopping.wait()
    finally:
        with trio.CancelScope(shield=True):
            await storage.aclose()


SPEC: ServiceSpec[RecorderConfig] = ServiceSpec(
    name="recorder",
    config_cls=RecorderConfig,
    main=main,
    schema="recorder",
    migrations="dovecote.recorder:migrations",
)
