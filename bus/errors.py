"""The bus's exceptions: one small tree, so callers catch what they mean.

::

    DovecoteError             (libs/errors.py) the root of every Dovecote error
    ├── ServiceError          a refusal: the handler raised it, ``Bus.request`` raises
    │                         it again on the caller's side (status, code, details)
    └── BusError              base of everything the bus raises on purpose
        ├── BusTimeout        no reply (or no stream credit/accept) within the deadline
        ├── BusClosed         the Bus (or a stream) was closed under the caller
        ├── CurveError        CURVE keys are missing, malformed or unsupported
        ├── ProtocolError     a frame does not follow the layout (bus/protocol.py)
        └── RemoteError       the other side failed: ``.code``, ``.message``

A refusal (:class:`~dovecote.libs.errors.ServiceError`) is not a
:class:`BusError`: the bus delivered the request and the service answered.

``RemoteError.code`` is a short machine-readable string.  The bus itself uses:

- ``worker_lost``: the worker that held the request died or disconnected;
- ``no_worker``: no worker registered for the service before the deadline;
- ``internal``: the handler raised something that is not a :class:`BusError`;
- ``unsupported``: the worker has no stream handler;
- ``protocol``: a malformed frame.

A handler may raise any ``BusError`` with a ``code`` attribute (``RemoteError``
itself, or a subclass of ``BusError`` that sets ``code``) to choose the code the
caller sees.
"""

from __future__ import annotations

from dovecote.libs.errors import DovecoteError


class BusError(DovecoteError):
    """Base class of the bus's exceptions."""

    code: str = "bus_error"


class BusTimeout(BusError, TimeoutError):
    """No reply arrived before the deadline."""

    code = "timeout"


class BusClosed(BusError):
    """The bus or the stream is closed."""

    code = "closed"


class CurveError(BusError):
    """CURVE security is misconfigured (bad key, or libzmq without CURVE)."""

    code = "curve"


class RemoteError(BusError):
    """The remote side (worker or broker) answered with an error.

    Attributes:
        code: Machine-readable error code (``worker_lost``, ``no_worker``, ...).
        message: Human-readable detail.
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message

    def __reduce__(self):  # keep pickling (e.g. across trio.to_thread) working
        return (type(self), (self.code, self.message))


# Codes the bus itself produces.
WORKER_LOST = "worker_lost"
NO_WORKER = "no_worker"
INTERNAL = "internal"
UNSUPPORTED = "unsupported"
PROTOCOL = "protocol"
