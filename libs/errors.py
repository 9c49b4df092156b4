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
