"""Sliding-window rate limits kept in PostgreSQL.

Limits live in the database, not in memory, so several auth workers share
them and a restart does not reset an attacker's budget. A bucket is a string
such as ``login:acct:<email>`` or ``login:ip:<address>``; :func:`check`
refuses with 429 and ``Retry-After`` once a bucket holds ``limit`` hits in the
last ``window_s`` seconds, and :func:`hit` records one.
"""

from __future__ import annotations

import math

from dovecote.libs.db import Connection
from dovecote.libs.errors import ServiceError


def check(conn: Connection, bucket: str, limit: int, window_s: int) -> None:
    """Raise 429 if ``bucket`` is over its limit."""
    row = conn.execute(
        """
        SELECT count(*) AS hits,
               EXTRACT(EPOCH FROM (min(at) + make_interval(secs => %s) - now())) AS wait
        FROM rate_limit_hits
        WHERE bucket = %s AND at > now() - make_interval(secs => %s)
        """,
        (window_s, bucket, window_s),
    ).fetchone()
    if row and row["hits"] >= limit:
        wait = max(1, math.ceil(float(row["wait"] or 1)))
        raise ServiceError(429, "rate_limited", "too many attempts; try again later",
                           retry_after=wait)


def hit(conn: Connection, bucket: str) -> None:
    """Record one attempt against ``bucket`` (and forget hits older than a day)."""
    conn.execute("INSERT INTO rate_limit_hits (bucket) VALUES (%s)", (bucket,))
    conn.execute("DELETE FROM rate_limit_hits WHERE bucket = %s AND at < now() - interval '1 day'",
                 (bucket,))


def clear(conn: Connection, bucket: str) -> None:
    """Forget a bucket's hits (after a successful login)."""
    conn.execute("DELETE FROM rate_limit_hits WHERE bucket = %s", (bucket,))
