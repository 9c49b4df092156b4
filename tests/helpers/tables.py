"""Which columns of a database hold a value (secrets at rest checks)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

TEXT_TYPES = ("text", "character varying", "character", "json", "jsonb", "bytea")


def tables_holding(database: str, value: str) -> list[str]:
    hits = []
    with psycopg.connect(database, autocommit=True) as conn:
        columns = conn.execute(
            "SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns "
            "JOIN information_schema.tables USING (table_schema, table_name) "
            "WHERE table_type = 'BASE TABLE' AND data_type = ANY(%s) "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')",
            (list(TEXT_TYPES),)).fetchall()
        assert len(columns) > 20, columns
        for schema, table, column, data_type in columns:
            target = sql.Identifier(schema, table)
            col = sql.Identifier(column)
            if data_type == "bytea":
                query = sql.SQL("SELECT count(*) FROM {} WHERE position(%s::bytea in {}) > 0").format(
                    target, col)
                param: Any = value.encode()
            else:
                query = sql.SQL("SELECT count(*) FROM {} WHERE strpos({}::text, %s) > 0").format(
                    target, col)
                param = value
            row = conn.execute(query, (param,)).fetchone()
            if row and row[0]:
                hits.append(f"{schema}.{table}.{column}")
    return hits
