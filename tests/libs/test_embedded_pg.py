"""Embedded PostgreSQL: start, reuse, ownership across processes, clean stop."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from dovecote.libs.embedded_pg import resolve_database_url, start_embedded_postgres

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: a concurrent pytest run re-chmods /tmp/pytest-of-root
    # to 0700, which would lock the server's system user out of its data.
    path = Path(tempfile.mkdtemp(prefix="dovecote-test-epg-"))
    yield path / "data"
    shutil.rmtree(path, ignore_errors=True)


def _postgres_processes(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("name") == "postgres" and str(pgdata) in " ".join(cmdline):
            found.append(proc)
    return found


def test_start_reuse_and_stop_leave_no_postgres_behind(data_dir: Path) -> None:
    first = start_embedded_postgres(data_dir)
    try:
        print(f"cold start (initdb + start): {first.startup_seconds:.2f}s")
        assert first.owned
        assert first.url.startswith("postgresql://")
        with psycopg.connect(first.url) as conn:
            row = conn.execute("SELECT current_database(), current_setting('listen_addresses')")
            assert row.fetchone() == ("dovecote", "")

        second = start_embedded_postgres(data_dir)  # same process: shared, ref-counted
        assert second.pid == first.pid
        assert second.url == first.url
        print(f"reuse of a running cluster: {second.startup_seconds:.3f}s")
        second.stop()
        assert first.is_running()  # still used by `first`
    finally:
        first.stop()
    assert not first.is_running()
    assert _postgres_processes(first.pgdata) == []
    first.stop()  # idempotent

    warm = start_embedded_postgres(data_dir)  # existing data dir: no initdb
    try:
        print(f"warm start (existing data dir): {warm.startup_seconds:.2f}s")
        assert warm.owned and warm.pid != first.pid
        with psycopg.connect(warm.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        warm.stop()
    assert _postgres_processes(warm.pgdata) == []


def test_a_process_that_did_not_start_the_cluster_does_not_stop_it(data_dir: Path) -> None:
    owner = start_embedded_postgres(data_dir)
    try:
        script = textwrap.dedent(f"""
            from pathlib import Path
            from dovecote.libs.embedded_pg import start_embedded_postgres
            h = start_embedded_postgres(Path({str(data_dir)!r}))
            assert not h.owned, h
            h.stop()
            print(h.pid)
        """)
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        assert int(out.stdout.strip()) == owner.pid
        assert owner.is_running()
    finally:
        owner.stop()
    assert not owner.is_running()


def test_an_orphaned_cluster_is_adopted_and_then_stopped(data_dir: Path) -> None:
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from dovecote.libs.embedded_pg import start_embedded_postgres
        h = start_embedded_postgres(Path({str(data_dir)!r}))
        print(h.pid, flush=True)
        os._exit(0)  # dies like a crashed supervisor: no stop(), no atexit
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    orphan_pid = int(out.stdout.strip())
    assert psutil.pid_exists(orphan_pid)
    adopted = start_embedded_postgres(data_dir)
    try:
        assert adopted.pid == orphan_pid
        assert adopted.owned
    finally:
        adopted.stop()
    assert not psutil.pid_exists(orphan_pid) or psutil.Process(orphan_pid).status() == "zombie"
    assert _postgres_processes(adopted.pgdata) == []


def test_resolve_database_url_prefers_database_url(tmp_path: Path) -> None:
    url = "postgresql://u@db.example/x"
    assert resolve_database_url({"DATABASE_URL": url}, tmp_path) == url
    assert not (tmp_path / "postgres").exists()
