"""The one exception tree of vmmgr: a caller catches :class:`VmmgrError`.

Everything vmmgr raises on purpose derives from it, and it derives from the
project's root (``libs/errors.py``), so "any Dovecote error" still catches
vmmgr's too::

    DovecoteError                         (libs/errors.py)
     ├── ServiceError                     a refusal answered to the caller (404, 409, 503...)
     └── VmmgrError                       base of vmmgr's own errors
          ├── AccelError                  the accelerator cannot be used (accel.py)
          ├── DriverError                 a VM operation failed (driver.py)
          │    ├── DriverUnavailable      the hypervisor cannot be reached
          │    ├── VmNotFound             no VM for this capsule on this host
          │    └── VmExists               a VM for this capsule already exists
          ├── EmulatorError               the QEMU wrapper cannot be installed (emulator.py)
          ├── ImageError                  a guest image is missing or could not be built (images.py)
          ├── NetguardError               the isolation rules could not be installed (netguard.py)
          └── AgentError                  the host-side guest-agent client (guest/errors.py)
               ├── AgentConnectError, AgentConnectionLost, AgentTimeout
               ├── AgentProtocolError     bad frame or flow-control violation; the I/O-free
               │                          ``guest/protocol.ProtocolError`` becomes this
               └── AgentRequestError      the agent refused (``code``): NotFound, AlreadyExists...

Two modules stay outside on purpose: ``guest/protocol.py`` and the
``guest/agent/`` package run inside the guest with the standard library and msgspec
only, so their exceptions (``protocol.ProtocolError``, the agent's own
refusals) cannot import this tree; the host-side client turns them into
:class:`AgentError` subclasses before any vmmgr code sees them.  Services
answering a bus request turn these errors into a ``ServiceError`` (with the
HTTP status the caller gets) where they handle them.
"""

from __future__ import annotations

from dovecote.libs.errors import DovecoteError

__all__ = ["VmmgrError"]


class VmmgrError(DovecoteError):
    """Base of every error vmmgr raises on purpose (other than refusals)."""
