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
     ├── ServiceError           a request a service refuses on purpose (bad input,
     │                          not found, conflict...); carries the HTTP status and
     │                          error code the gateway answers with
     └── StorageError           any failure of the object store (libs/storage.py),
          │                     including an invalid key
          └── NotFoundInStorage the key does not exist

The original driver exception (psycopg, botocore, OSError) is always chained as
``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatabaseError",
    "DovecoteError",
    "MigrationError",
    "NotFoundInStorage",
    "ServiceError",
    "StorageError",
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

    A bus handler raises it; the runtime's dispatcher turns it into a
    :class:`~dovecote.bus.messages.common.Failure` reply, and the gateway
    answers ``status`` with ``{"error": {"code": code, "message": message}}``.

    Attributes:
        status: the HTTP status (4xx, or 503 for a dependency that is down).
        code: a stable machine-readable code (``not_found``, ``email_taken``).
        message: a human-readable explanation, safe to show to the caller.
        retry_after: seconds, for 429 answers (sent as ``Retry-After``).
    """

    def __init__(self, status: int, code: str, message: str, *,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
