"""RFC 3339 text of instants, the one way every service writes them.

The API shows UTC with a ``Z`` suffix (``2026-12-05T01:41:18.123456Z``), as the
reference does. Naive datetimes are taken as UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def rfc3339(value: datetime) -> str: ...
@overload
def rfc3339(value: None) -> None: ...
@overload
def rfc3339(value: datetime | None) -> str | None: ...


def rfc3339(value: datetime | None) -> str | None:
    """RFC 3339 text of ``value`` in UTC with ``Z``, or None for None."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def unix_rfc3339(seconds: float) -> str:
    """RFC 3339 text of a Unix time."""
    return rfc3339(datetime.fromtimestamp(seconds, UTC))


def now_rfc3339() -> str:
    """RFC 3339 text of now."""
    return rfc3339(datetime.now(UTC))
