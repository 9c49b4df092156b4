"""Desktop capsules: the desktop template of this host, and screenshots of a VM's display.

The desktops service (``services/desktops/qemu.py``) runs a desktop session as
a capsule of template ``desktop``: a VM of the *desktop image*
(``infra/guest/desktop.py``: X.Org on the VM's standard VGA, openbox, the
desktop user ``dove``) booted once per host until its desktop is up, then
frozen (:func:`dovecote.vmmgr.templates.ensure_desktop`), so that a session
is a restore, not a boot.

:class:`DesktopTemplates` answers two messages:

- :class:`~dovecote.bus.messages.capsules.EnsureDesktopTemplate`: the
  template's status at once (``ready``, ``building`` with the current step,
  ``failed`` with the reason, ``unavailable`` without a driver), starting its
  build in the background unless it is ready or under way. The build gets the
  desktop image (cached by content hash like the capsule image; minutes the
  first time, its steps shown) and then the template (a cold boot under TCG:
  a minute or two; cached under the image directory's ``templates/``). With
  ``DOVECOTE_DESKTOP_TEMPLATE=true`` vmmgr starts it when its driver is up;
  otherwise the first request does;
- :class:`~dovecote.bus.messages.capsules.CaptureScreen`: the display of a
  running capsule as PNG, from the hypervisor (libvirt's screenshot of the VM's
  display device): it needs no guest agent, so it works before a desktop
  session's bridge is up.

The status also shows in vmmgr's ``/healthz`` (``desktop_template``).
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import trio

from dovecote.bus.messages import capsules as m
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger
from dovecote.vmmgr.capsules import Capsules
from dovecote.vmmgr.driver import DriverError, VmNotFound
from dovecote.vmmgr.screenshots import png_size

log = get_logger("dovecote.vmmgr.desktop")

RUNNING = "running"


class DesktopTemplates:
    """This host's desktop template (built once, on demand) and host-side screenshots.

    The browser template (:class:`dovecote.vmmgr.browser.BrowserTemplates`) is the same
    machinery with another :attr:`kind` and :meth:`_make`.
    """

    kind = "desktop"
    """The template's name: the lifecycle attribute its files go to and its health entry."""

    def __init__(self, capsules: Capsules, *, image_dir: Any, health: dict[str, Any],
                 boot_timeout_s: float = 900.0) -> None:
        self.capsules = capsules
        self.image_dir = image_dir
        """A callable giving the image cache directory (known once the driver is up)."""
        self.health = health
        self.boot_timeout_s = boot_timeout_s
        self.status: m.DesktopTemplateState = "unavailable"
        self.detail = "not built yet"
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()
        self._done.set()
        self._report()

    def register(self, handle: Any) -> None:
        handle(m.EnsureDesktopTemplate, self.ensure)
        handle(m.CaptureScreen, self.screenshot)
        handle(m.ShareDirectory, self.share)

    def _report(self) -> None:
        self.health[f"{self.kind}_template"] = f"{self.status}: {self.detail}" if self.detail else self.status

    def _set(self, status: m.DesktopTemplateState, detail: str = "") -> None:
        self.status, self.detail = status, detail[:300]
        self._report()

    def _reply(self) -> m.DesktopTemplateStatus:
        files = getattr(self.capsules.lifecycle, self.kind)
        return m.DesktopTemplateStatus(
            status=self.status, detail=self.detail, host_id=self.capsules.host_id,
            vcpus=files.vcpus if files is not None else 0,
            memory_mb=files.memory_mb if files is not None else 0)

    # -- the template ----------------------------------------------------------------

    async def ensure(self, msg: m.EnsureDesktopTemplate | None = None) -> m.DesktopTemplateStatus:
        """The template's status; starts its build unless it is ready or under way."""
        if self.status != "ready" and self._done.is_set() and (msg is None or msg.build):
            if self.capsules.machines.driver is None:
                self._set("unavailable", f"the VM driver is not ready ({self.capsules.machines.status})")
                return self._reply()
            self._done = trio.Event()
            self._set("building", "starting")
            self.capsules.nursery.start_soon(self._build)
        return self._reply()

    async def build_when_ready(self) -> None:
        """``DOVECOTE_DESKTOP_TEMPLATE=true``: build as soon as the driver is up."""
        await self.capsules.machines.ready.wait()
        await self.ensure()

    async def wait(self) -> m.DesktopTemplateStatus:
        """Start the build if needed and wait for it to end (ready or failed)."""
        await self.ensure()
        await self._done.wait()
        return self._reply()

    async def _build(self) -> None:
        from dovecote.vmmgr.images import DESKTOP_BUILDER, ensure_guest_image

        began = time.monotonic()
        self._scope = trio.CancelScope()
        try:
            with self._scope:
                driver, _ = self.capsules.machines.require()
                image_dir = self.image_dir()
                self._set("building", "the desktop image")
                image = await ensure_guest_image(
                    image_dir, builder=DESKTOP_BUILDER,
                    on_progress=lambda step: self._set("building", f"the desktop image: {step}"))
                self._set("building", f"the template: booting the {self.kind} and freezing it")
                files = await self._make(driver, image, image_dir)
                setattr(self.capsules.lifecycle, self.kind, files)
                self._set("ready", "")
                log.info(f"the {self.kind} template is ready", extra={
                    "dir": str(files.directory), "seconds": round(time.monotonic() - began, 1)})
            if self._scope.cancelled_caught:
                self._set("failed", f"vmmgr stopped while the {self.kind} template was being built")
        except Exception as exc:
            log.warning(f"the {self.kind} template could not be built", exc_info=True)
            self._set("failed", f"{type(exc).__name__}: {exc}")
        finally:
            self._scope = None
            self._done.set()

    async def _make(self, driver: Any, image: Any, image_dir: Any) -> Any:
        """Boot the template's VM from ``image`` and freeze it (cached: at once)."""
        from dovecote.vmmgr.templates import ensure_desktop

        return await ensure_desktop(driver, image, image_dir, boot_timeout_s=self.boot_timeout_s)

    async def stop(self, timeout_s: float) -> None:
        """End a build in progress (its VM is destroyed while the driver is still connected)."""
        if self._scope is not None:
            self._scope.cancel()
        with trio.move_on_after(timeout_s):
            await self._done.wait()

    # -- screenshots -----------------------------------------------------------------

    async def screenshot(self, msg: m.CaptureScreen) -> m.ScreenImage:
        row = await self.capsules.find(msg.actor, msg.capsule_id, msg.admin)
        self.capsules.require_local(row)
        if row["status"] != RUNNING:
            raise ServiceError(409, "not_running", f"capsule {row['id']} is {row['status']}")
        driver, _ = self.capsules.machines.require()
        try:
            png = await driver.screenshot(row["id"])
        except VmNotFound:
            raise ServiceError(409, "not_running", f"capsule {row['id']} has no VM on this host") from None
        except DriverError as exc:
            raise ServiceError(502, "screenshot_failed",
                               f"the VM's display could not be read: {exc}") from None
        width, height = png_size(png)
        return m.ScreenImage(png=png, width=width, height=height)

    # -- host directories ------------------------------------------------------------

    async def share(self, msg: m.ShareDirectory) -> m.CapsuleDone:
        """A host directory into a running desktop capsule's share (see :class:`m.ShareDirectory`)."""
        row = await self.capsules.find(msg.actor, msg.capsule_id, msg.admin)
        self.capsules.require_local(row)
        if row["template"] != "desktop":
            raise ServiceError(400, "invalid_request", f"capsule {row['id']} is not a desktop capsule")
        if row["status"] != RUNNING:
            raise ServiceError(409, "not_running", f"capsule {row['id']} is {row['status']}")
        path = Path(msg.host_path)
        if not await trio.to_thread.run_sync(_plain_directory, path):
            raise ServiceError(400, "invalid_request",
                               "host_path must be an existing directory named by its real absolute path")
        driver, _ = self.capsules.machines.require()
        owner = getattr(driver, "qemu_owner", None)
        try:
            if owner is not None:
                await trio.to_thread.run_sync(grant_access, path, owner[0])
            await driver.share_into(row["id"], path)
        except VmNotFound:
            raise ServiceError(409, "not_running", f"capsule {row['id']} has no VM on this host") from None
        except (DriverError, OSError) as exc:
            raise ServiceError(502, "share_failed", f"the directory could not be shared: {exc}") from None
        return m.CapsuleDone()


def _plain_directory(path: Path) -> bool:
    """``path`` is absolute, resolved (no symlink, no ``..``), a directory, and not ``/``."""
    return path.is_absolute() and str(path.resolve()) == str(path) and path.is_dir() \
        and path != Path("/")


ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
_ACL_UNDEFINED = 0xFFFFFFFF


def grant_access(path: Path, uid: int) -> None:
    """Let ``uid`` (QEMU's user) read, write and enter ``path``, and what is created in it
    later: a named-user entry in its POSIX ACL and in its default ACL (blocking).

    Written as the kernel's ``system.posix_acl_*`` attributes (what ``setfacl -m
    u:UID:rwx,d:u:UID:rwx`` does), merged into any ACL already there; the mask is
    widened to let the entry count. Nothing else of the directory changes.
    """
    mode = path.stat().st_mode
    for name in (ACL_ACCESS, ACL_DEFAULT):
        try:
            entries = _acl_decode(os.getxattr(path, name))
        except OSError:
            entries = {}
        if not entries:  # the ACL the mode bits stand for
            entries = {(_ACL_USER_OBJ, _ACL_UNDEFINED): (mode >> 6) & 7,
                       (_ACL_GROUP_OBJ, _ACL_UNDEFINED): (mode >> 3) & 7,
                       (_ACL_OTHER, _ACL_UNDEFINED): mode & 7}
        entries[(_ACL_USER, uid)] = 7
        mask = 0
        for (tag, _id), perm in entries.items():
            if tag in (_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP):
                mask |= perm
        entries[(_ACL_MASK, _ACL_UNDEFINED)] = entries.get((_ACL_MASK, _ACL_UNDEFINED), 0) | mask
        os.setxattr(path, name, _acl_encode(entries))


def _acl_decode(data: bytes) -> dict[tuple[int, int], int]:
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != 2:
        return {}
    return {(tag, ident): perm for tag, perm, ident in struct.iter_unpack("<HHI", data[4:])}


def _acl_encode(entries: dict[tuple[int, int], int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for (tag, ident), perm in sorted(entries.items()))
