"""Fixtures for the data layer tests: fresh schemas, an open Database, S3 (moto) and storages."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from dovecote.libs.db import Database, open_database
from dovecote.libs.storage import FilesystemStorage, S3Storage, Storage


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A unique schema name for one test; the schema (if created) is dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
async def database(postgres_url: str, pg_schema: str) -> AsyncIterator[Database]:
    """An open Database whose (existing, empty) schema is fresh for this test."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
    async with open_database(postgres_url, schema=pg_schema, max_size=4) as db:
        yield db


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """A real S3 endpoint: moto's server in a subprocess on a free 127.0.0.1 port."""
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["filesystem", "s3"])
def storage_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """An unopened storage of each backend (a fresh root or bucket per test)."""
    if request.param == "filesystem":
        return FilesystemStorage(tmp_path / "storage")
    endpoint = request.getfixturevalue("s3_endpoint_url")
    return S3Storage(
        f"test-{uuid.uuid4().hex[:12]}",
        endpoint_url=endpoint,
        region="us-east-1",
        create_bucket=True,
        part_size=5 * 1024 * 1024,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
async def storage(storage_backend: Storage) -> AsyncIterator[Storage]:
    """The same contract tests run against the filesystem and against S3 (moto server)."""
    try:
        yield storage_backend
    finally:
        await storage_backend.aclose()
