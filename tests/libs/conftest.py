"""Fixtures for the data layer tests: fresh schemas, an open Database, S3 (moto) and storages."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from dovecote.libs.db import Database, open_database
from dovecote.libs.storage import FilesystemStorage, S3Storage, Storage
from tests.helpers.s3 import moto_server


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


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """A real S3 endpoint: moto's server in a subprocess on a free 127.0.0.1 port."""
    with moto_server() as url:
        yield url


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
