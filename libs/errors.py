"""The one exception tree of Dovecote's shared libraries.

Every error that a library in ``dovecote.libs`` raises on purpose derives from
:class:`DovecoteError`, so a service can catch "anything Dovecote knows about"
in one place and let real bugs (``TypeError``, ``AssertionError``) through::

    DovecoteError
     ├── ConfigError            bad or missing configuration (libs/config.py)
     ├── DatabaseError          any failure talking to PostgreSQL (libs/db.py)
     │    └── UniqueViolation   a unique/primary-key constraint was violated;
     │                          ``.constraint`` names it, services answer 409
     ├── MigrationError         a migration failed, or an applied migration's
     │                          file changed (libs/migrations.py)
     ├── ServiceError           a request a service refuses on purpose; carries the
     │    │                     HTTP status, error code, message and details the
     │    │                     gateway answers with.  ``ServiceError(404, ...)``
     │    │                     is created as the subclass of its status:
     │    ├── BadRequest        400
     │    ├── Unauthorized      401
     │    ├── Forbidden         403
     │    ├── NotFound          404
     │    ├── Conflict          409
     │    ├── PayloadTooLarge   413
     │    ├── RateLimited       429 (``retry_after``)
     │    ├── Unavailable       503 (a dependency is down or not ready)
     │    └── ApiError          the gateway's HTTP answer (gateway/errors.py)
     └── StorageError           any failure of the object store (libs/storage.py),
          │                     including an invalid key
          └── NotFoundInStorage the key does not exist

    BusError                    the bus (bus/errors.py): BusTimeout, BusClosed,
                                CurveError, RemoteError (``worker_lost``, ...)

The original driver exception (psycopg, botocore, OSError) is always chained as
``__cause__``.

Refusals cross the bus as exceptions: a handler raises :class:`ServiceError`,
the bus sends it as a ``Failure`` reply (the wire form), and the caller's
``Bus.request`` raises the same :class:`ServiceError` (of the same subclass)
instead of returning anything.  The gateway maps every :class:`DovecoteError`
to the documented error shape in one place (``gateway/errors.api_error``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRequest",
    "ConfigError",
    "Conflict",
    "DatabaseError",
    "DovecoteError",
    "Forbidden",
    "MigrationError",
    "NotFound",
    "NotFoundInStorage",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceError",
    "StorageError",
    "Unauthorized",
    "Unavailable",
    "UniqueViolation",
]


class DovecoteError(Exception):
    """Base class of every error raised on purpose by Dovecote code."""


class ConfigError(DovecoteError):
    """The configuration (usually the environment) is missing or invalid."""


class DatabaseError(DovecoteError):
    """A database operation failed.

    Attributes:
        sqlstate: the five-character SQLSTATE reported by PostgreSQL, or None when
            the failure happened before the server answered (pool timeout,
            connection refused).
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class UniqueViolation(DatabaseError):
    """A unique or primary-key constraint was violated (SQLSTATE 23505).

    Attributes:
        constraint: the name of the violated constraint (e.g. ``users_email_key``),
            or None if the server did not report it.
    """

    def __init__(self, message: str, *, constraint: str | None, sqlstate: str = "23505") -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.constraint = constraint


class MigrationError(DovecoteError):
    """Migrations could not be applied, or the applied history does not match the files."""


class StorageError(DovecoteError):
    """An object-store operation failed, or a key is invalid."""


class NotFoundInStorage(StorageError):
    """The requested key does not exist in the object store.

    Attributes:
        key: the key that was looked up.
    """

    def __init__(self, key: str) -> None:
        super().__init__(f"no object with key {key!r}")
        self.key = key


class ServiceError(DovecoteError):
    """A request a service refuses on purpose, with the answer the client gets.

    A bus handler raises it; the bus sends it to the caller as a
    :class:`~dovecote.bus.messages.common.Failure` reply, where
    ``Bus.request`` raises it again, and the gateway answers ``status`` with
    ``{"error": {"code": code, "message": message}}``.

    ``ServiceError(status, ...)`` builds the subclass of that status
    (``ServiceError(404, ...)`` is a :class:`NotFound`), so a caller catches
    ``NotFound`` whether the refusal was raised here or across the bus.
    Subclasses take the same arguments.

    Attributes:
        status: the HTTP status (4xx, or 503 for a dependency that is down).
        code: a stable machine-readable code (``not_found``, ``email_taken``).
        message: a human-readable explanation, safe to show to the caller.
        details: optional structured data for the caller (never secrets).
        retry_after: seconds, for 429 answers (sent as ``Retry-After``).
    """

    status: int
    code: str
    message: str

    def __new__(cls, status: int, *args: Any, **kwargs: Any) -> ServiceError:
        if cls is ServiceError:
            cls = _BY_STATUS.get(status, ServiceError)
        return super().__new__(cls)

    def __init__(self, status: int, code: str, message: str, *,
                 details: dict[str, Any] | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after

    def __reduce__(self) -> Any:  # pickling (e.g. across trio.to_thread) keeps every field
        return (_restore, (type(self), self.status, self.code, self.message, self.details,
                           self.retry_after))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


def _restore(cls: type[ServiceError], status: int, code: str, message: str,
             details: dict[str, Any] | None, retry_after: int | None) -> ServiceError:
    return cls(status, code, message, details=details, retry_after=retry_after)


class BadRequest(ServiceError):
    """400: the request is malformed or names something invalid."""


class Unauthorized(ServiceError):
    """401: no valid credentials."""


class Forbidden(ServiceError):
    """403: the caller may not do this."""


class NotFound(ServiceError):
    """404: the thing does not exist (or is not visible to the caller)."""


class Conflict(ServiceError):
    """409: the thing is not in a state that allows the request."""


class PayloadTooLarge(ServiceError):
    """413: the body or the file is over a limit."""


class RateLimited(ServiceError):
    """429: a quota or a rate limit; ``retry_after`` says when to retry."""


class Unavailable(ServiceError):
    """503: a dependency is down or not ready (the request may succeed later)."""


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 429: RateLimited, 503: Unavailable,
}
