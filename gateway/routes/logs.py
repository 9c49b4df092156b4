"""The services' log files: ``/api/logs/files``, ``/api/logs/files/{filename}``, ``/api/logs/stream``
(the agent runs reference, tag ``logs``), for platform admins only.

Every service process writes its structured JSON lines to
``<data dir>/logs/<service>.log`` (rotated to ``.1`` ... by
:func:`dovecote.libs.logs.setup_logging`); these routes read that directory
of the gateway's host. Anyone but a platform admin with a session gets 403
(401 without credentials) before anything is read.

- ``GET /api/logs/files``: ``[{name, size, modified}]``, newest first.
- ``GET /api/logs/files/{filename}``: one file as ``text/plain``. A name that
  is not ``<service>.log`` or ``<service>.log.<n>`` (``../x``, ``.x``, a slash)
  is 400 ``invalid_log_file`` before the file system is touched; a valid name
  that is not there is 404. Files over :data:`MAX_FILE_BYTES` send their tail.
- ``GET /api/logs/stream``: SSE, each frame ``data: <log entry json>`` (no
  ``event:`` line): the last ``tail`` entries (default 100, at most 1000) of
  the current files merged by time, then live entries as the files grow
  (polled every :data:`POLL_S`; a rotated file is followed from its start).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import trio
from quart import Response, request

from dovecote.gateway.calls import json_response
from dovecote.gateway.errors import ApiError
from dovecote.gateway.state import GatewayState
from dovecote.libs.logs import LOG_FILE_NAME

TAGS = ["logs"]
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_TAIL = 1000
POLL_S = 0.25
KEEPALIVE_S = 15.0
MAX_LINE = 64 * 1024
TAIL_WINDOW = 512 * 1024
"""How much of each file's end is read for the stream's catch-up."""
_limiter = trio.CapacityLimiter(4)


class LogFile(msgspec.Struct, kw_only=True):
    name: str
    size: int
    modified: str


class StreamQuery(msgspec.Struct, kw_only=True):
    tail: int = 100


def log_dir(state: GatewayState) -> Path:
    return Path(state.config.data_dir).resolve() / "logs"


def check_name(filename: str) -> str:
    if not LOG_FILE_NAME.match(filename):
        raise ApiError(
            400,
            "invalid_log_file",
            "a log file name is <service>.log or <service>.log.<n> (letters, digits, '-' and '_')",
        )
    return filename


def list_files(directory: Path) -> list[LogFile]:
    files = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not LOG_FILE_NAME.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        stat = entry.stat(follow_symlinks=False)
        modified = datetime.fromtimestamp(stat.st_mtime, UTC).isoformat().replace("+00:00", "Z")
        files.append(LogFile(name=entry.name, size=stat.st_size, modified=modified))
    files.sort(key=lambda f: (f.modified, f.name), reverse=True)
    return files


def read_file(directory: Path, name: str) -> bytes | None:
    path = directory / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):
        return None
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_FILE_BYTES:
            handle.seek(size - MAX_FILE_BYTES)
            handle.readline()  # start at a whole line
        return handle.read(MAX_FILE_BYTES)


def parse(line: bytes) -> dict[str, Any] | None:
    if not line.strip() or len(line) > MAX_LINE:
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


@dataclass
class Cursor:
    inode: int
    offset: int


class Follower:
    """The current ``*.log`` files of a directory, read from where the last poll stopped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cursors: dict[str, Cursor] = {}

    def _current(self) -> list[str]:
        try:
            return sorted(
                n for n in os.listdir(self.directory) if n.endswith(".log") and LOG_FILE_NAME.match(n)
            )
        except FileNotFoundError:
            return []

    def catch_up(self, tail: int) -> list[dict[str, Any]]:
        """The last ``tail`` entries of the current files, oldest first; later polls start at their ends."""
        entries: list[dict[str, Any]] = []
        for name in self._current():
            try:
                with open(self.directory / name, "rb") as handle:
                    stat = os.fstat(handle.fileno())
                    start = max(0, stat.st_size - TAIL_WINDOW)
                    handle.seek(start)
                    data = handle.read(stat.st_size - start)
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            lines = data[:end].split(b"\n")
            if start > 0:
                lines = lines[1:]  # a partial first line
            self.cursors[name] = Cursor(inode=stat.st_ino, offset=start + end)
            entries.extend(e for e in map(parse, lines) if e is not None)
        entries.sort(key=lambda e: str(e.get("ts", "")))
        return entries[-tail:] if tail else []

    def poll(self) -> list[dict[str, Any]]:
        """The entries written since the last call."""
        entries: list[dict[str, Any]] = []
        for name in self._current():
            try:
                with open(self.directory / name, "rb") as handle:
                    stat = os.fstat(handle.fileno())
                    cursor = self.cursors.get(name)
                    if cursor is None or cursor.inode != stat.st_ino or stat.st_size < cursor.offset:
                        cursor = self.cursors[name] = Cursor(inode=stat.st_ino, offset=0)  # new or rotated
                    if stat.st_size == cursor.offset:
                        continue
                    handle.seek(cursor.offset)
                    data = handle.read(min(stat.st_size - cursor.offset, 4 * 1024 * 1024))
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            cursor.offset += end
            entries.extend(e for e in map(parse, data[:end].split(b"\n")) if e is not None)
        entries.sort(key=lambda e: str(e.get("ts", "")))
        return entries


def frame(entry: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(entry, separators=(",", ":")).encode() + b"\n\n"


def register(state: GatewayState) -> None:
    """Add the log file routes."""
    api, app, edge = state.api, state.app, state.edge

    @api.route(
        app,
        "GET",
        "/api/logs/files",
        summary="The services' log files (platform admins)",
        tags=TAGS,
        responses={200: list[LogFile]},
        descriptions={403: "not a platform admin with a session"},
    )
    async def list_log_files() -> Response:
        await edge.platform_admin()
        files = await trio.to_thread.run_sync(list_files, log_dir(state), limiter=_limiter)
        return json_response(files)

    async def get_log_file(filename: str) -> Response:
        await edge.platform_admin()
        name = check_name(filename)
        data = await trio.to_thread.run_sync(read_file, log_dir(state), name, limiter=_limiter)
        if data is None:
            raise ApiError(404, "not_found", f"no log file {name}")
        return Response(data, status=200, content_type="text/plain; charset=utf-8")

    api.route(
        app,
        "GET",
        "/api/logs/files/{filename}",
        summary="One log file as plain text (platform admins)",
        tags=TAGS,
        responses={200: None},
        descriptions={400: "invalid_log_file: not <service>.log[.<n>]", 404: "no such log file"},
    )(get_log_file)
    # A name with a slash (``..%2Fx``) reaches the same view, to be refused as a name.
    app.add_url_rule("/api/logs/files/<path:filename>", "get_log_file_path", get_log_file, methods=["GET"])

    @api.route(
        app,
        "GET",
        "/api/logs/stream",
        summary="SSE: recent log entries, then live ones (platform admins)",
        tags=TAGS,
        query=StreamQuery,
        responses={200: None},
    )
    async def log_stream() -> Response:
        await edge.platform_admin()
        raw = request.args.get("tail", "100")
        if not raw.isdigit() or int(raw) > MAX_TAIL:
            raise ApiError(400, "invalid_request", f"tail is an integer from 0 to {MAX_TAIL}")
        tail = int(raw)
        follower = Follower(log_dir(state))
        recent = await trio.to_thread.run_sync(follower.catch_up, tail, limiter=_limiter)

        async def frames() -> AsyncIterator[bytes]:
            yield b": logs\n\n"
            if recent:
                yield b"".join(frame(e) for e in recent)
            quiet = 0.0
            while True:
                await trio.sleep(POLL_S)
                entries = await trio.to_thread.run_sync(follower.poll, limiter=_limiter)
                if entries:
                    quiet = 0.0
                    yield b"".join(frame(e) for e in entries)
                else:
                    quiet += POLL_S
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield b": keepalive\n\n"

        response = Response(
            frames(),
            status=200,
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        response.timeout = None
        return response
