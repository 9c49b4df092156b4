"""Fixtures of the metrics tests: the metrics service's schema, migrated, fresh per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from dovecote.libs.db import Database, open_database
from dovecote.libs.migrations import apply_migrations

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "metrics" / "migrations"


@pytest.fixture
async def metrics_db(postgres_url: str) -> AsyncIterator[Database]:
    schema = f"t_metrics_{uuid.uuid4().hex[:12]}"
    async with open_database(postgres_url, schema=schema, max_size=4) as db:
        await apply_migrations(db, schema, MIGRATIONS)
        yield db
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
