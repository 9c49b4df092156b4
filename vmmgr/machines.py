"""The hypervisor side of a vmmgr, once ready: its driver and guest image."""

from __future__ import annotations

import trio

from dovecote.libs.errors import ServiceError
from dovecote.vmmgr.driver import Driver
from dovecote.vmmgr.images import GuestImage

DRIVER_WAIT_S = 10.0
"""How long an operation on a running capsule waits for a restarting vmmgr's driver."""


class Machines:
    """The driver and guest image of this host, and how far their set-up got.

    ``status`` is what ``/healthz`` shows as the ``image`` detail:
    ``disabled`` (no driver configured), ``building``, ``ready`` or
    ``failed: ...``.
    """

    def __init__(self) -> None:
        self.driver: Driver | None = None
        self.image: GuestImage | None = None
        self.status = "building"
        self.ready = trio.Event()
        self.base_size_mib: int | None = None
        self.isolation_error: str | None = None
        """Why capsules would not be isolated from the host (the guard failed), or None."""

    def set_ready(self, driver: Driver, image: GuestImage, base_size_mib: int | None = None) -> None:
        self.driver, self.image, self.base_size_mib = driver, image, base_size_mib
        self.status = "ready"
        self.ready.set()

    def require(self) -> tuple[Driver, GuestImage]:
        """The driver and image, or 503 saying why there are none yet."""
        if self.driver is not None and self.image is not None:
            return self.driver, self.image
        if self.status.startswith("disabled"):
            raise ServiceError(503, "vm_driver_disabled",
                               f"this host runs no VM driver ({self.status}; "
                               "set DOVECOTE_VM_DRIVER=libvirt)")
        if self.status.startswith("failed"):
            raise ServiceError(503, "vm_unavailable", f"VMs are unavailable on this host: {self.status}")
        raise ServiceError(503, "image_not_ready",
                           "the guest image is still being built on this host; retry in a minute",
                           retry_after=30)

    async def require_soon(self, wait_s: float = DRIVER_WAIT_S) -> tuple[Driver, GuestImage]:
        """:meth:`require`, after waiting (at most ``wait_s``) for a driver that is connecting.

        A vmmgr that was just restarted serves the bus at once and connects its
        driver a second or two later (the image is cached): an operation on a
        running capsule waits for it instead of being refused ``image_not_ready``.
        """
        if self.driver is None and not self.status.startswith(("disabled", "failed")):
            with trio.move_on_after(wait_s):
                await self.ready.wait()
        return self.require()

    def require_isolation(self) -> None:
        """Refuse to run a capsule's guest when the network guard is not in place (fail closed)."""
        if self.isolation_error is not None:
            raise ServiceError(503, "isolation_unavailable",
                               "capsules cannot be isolated from this host's network: "
                               f"{self.isolation_error} (fix it, or set DOVECOTE_VM_NETGUARD=false "
                               "to run capsules without the guard)")
