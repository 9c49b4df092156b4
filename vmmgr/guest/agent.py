#!/usr/bin/env python3
"""Dovecote guest agent: exec, processes, PTYs and files over one byte channel.

This file runs INSIDE each capsule VM (Debian bookworm, python3-minimal), so it
uses only the standard library and msgspec, and imports its sibling
``protocol.py`` (copied next to it).  It is also run on the host by the tests
with ``--listen-unix PATH``.

    python3 agent.py --device /dev/virtio-ports/org.dovecote.agent   # guest
    python3 agent.py --listen-unix /tmp/x/agent.sock                # tests

Why the shape
-------------
One asyncio loop holds the state that must outlive a host connection: the
background processes and PTYs the agent started, each with a bounded output
ring.  A *session* is one host connection: it owns a frame decoder, a writer
task, the requests in flight and the streams attached to processes.  When the
channel reports EOF (the host side of a virtio-serial port is not connected:
reads return 0 or EIO and poll reports POLLHUP) the session ends, its tasks are
cancelled, and processes and PTYs keep running; the device is reopened with
backoff and a new session starts.  The unix-socket mode serves one connection
at a time through exactly the same session code.

Channel I/O runs in two threads per session (poll + non-blocking read/write on
one file descriptor), because a character device and a socket then behave the
same and a stuck write never blocks the loop.  Every wait in those threads
polls with a short timeout so a session can be stopped.

The agent never blocks on a slow host: process and PTY output is read as fast
as it comes into the ring (oldest output is dropped past the ring size and the
reader is told how much it skipped); file transfers use the protocol's credits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import fcntl
import grp
import logging
import os
import posixpath
import pwd
import secrets
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import termios
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

try:
    from . import protocol as P
except ImportError:  # run as a script inside the guest: protocol.py is a sibling
    import protocol as P  # type: ignore[no-redef]

AGENT_VERSION = "0.1.0"
RING_BYTES = 1024 * 1024
READ_SIZE = 256 * 1024
POLL_MS = 200
RETAIN_EXITED = 64
UPLOAD_IDLE_TIMEOUT = 120.0
MAX_PATH = 4096

log = logging.getLogger("dovecote-agent")


class AgentError(Exception):
    """A request failed with a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.EISDIR: "is_a_directory",
    errno.ENOTDIR: "not_a_directory",
    errno.EEXIST: "already_exists",
    errno.ENOTEMPTY: "already_exists",
    errno.ENAMETOOLONG: "invalid_path",
    errno.ELOOP: "invalid_path",
}


def os_error(exc: OSError, what: str = "") -> AgentError:
    code = _ERRNO_CODES.get(exc.errno or 0, "io_error")
    where = f"{what}: " if what else ""
    return AgentError(code, f"{where}{exc.strerror or exc}")


def check_path(path: str) -> str:
    """Validate and normalize an absolute path."""
    if not isinstance(path, str) or not path:
        raise AgentError("invalid_path", "path is empty")
    if "\0" in path:
        raise AgentError("invalid_path", "path contains a NUL byte")
    if len(path) > MAX_PATH:
        raise AgentError("invalid_path", f"path longer than {MAX_PATH} characters")
    if not path.startswith("/"):
        raise AgentError("invalid_path", f"path must be absolute: {path!r}")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


# ------------------------------------------------------------------ file entries

_names: dict[tuple[str, int], str] = {}


def _owner(uid: int) -> str:
    key = ("u", uid)
    if key not in _names:
        try:
            _names[key] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _names[key] = str(uid)
    return _names[key]


def _group(gid: int) -> str:
    key = ("g", gid)
    if key not in _names:
        try:
            _names[key] = grp.getgrgid(gid).gr_name
        except KeyError:
            _names[key] = str(gid)
    return _names[key]


def file_entry(path: str, st: os.stat_result | None = None) -> P.FileEntry:
    if st is None:
        st = os.lstat(path)
    target = None
    if stat.S_ISLNK(st.st_mode):
        kind = "symlink"
        with contextlib.suppress(OSError):
            target = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        kind = "directory"
    else:
        kind = "file"
    return P.FileEntry(
        name=posixpath.basename(path) or "/",
        path=path,
        type=kind,
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        permissions=stat.filemode(st.st_mode),
        owner=_owner(st.st_uid),
        group=_group(st.st_gid),
        modified_at=int(st.st_mtime),
        symlink_target=target,
    )


def _lstat_or_error(path: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise os_error(exc, path) from None


def list_dir(path: str, depth: int, max_entries: int) -> tuple[list[P.FileEntry], bool]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise AgentError("not_a_directory", f"{path}: not a directory")
    depth = max(1, depth)
    entries: list[P.FileEntry] = []

    def walk(directory: str, level: int) -> bool:
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if directory == path:
                raise os_error(exc, path) from None
            return True  # unreadable subdirectory: list what we can
        for child in children:
            if len(entries) >= max_entries:
                return False
            try:
                entry = file_entry(child.path, child.stat(follow_symlinks=False))
            except OSError:
                continue
            entries.append(entry)
            if entry.type == "directory" and level < depth and not walk(child.path, level + 1):
                return False
        return True

    complete = walk(path, 1)
    return entries, not complete


def _makedirs(path: str, mode: int = 0o777, owner: tuple[int, int] | None = None) -> None:
    """``os.makedirs(path, mode, exist_ok=True)``; the directories it creates get ``owner``."""
    if os.path.isdir(path):
        return
    missing = []
    probe = path
    while probe not in ("", "/") and not os.path.lexists(probe):
        missing.append(probe)
        probe = posixpath.dirname(probe)
    os.makedirs(path, mode, exist_ok=True)
    if owner is not None:
        for directory in missing:
            with contextlib.suppress(OSError):
                os.chown(directory, *owner)


def _resolve_target(path: str, parents: bool, owner: tuple[int, int] | None = None) -> str:
    """The file a write replaces: follows a symlink, creates parents, refuses directories."""
    real = os.path.realpath(path) if os.path.islink(path) else path
    if os.path.isdir(real):
        raise AgentError("is_a_directory", f"{path}: is a directory")
    parent = posixpath.dirname(real)
    if parents:
        try:
            _makedirs(parent, owner=owner)
        except FileExistsError:
            raise AgentError("not_a_directory", f"{parent}: not a directory") from None
        except OSError as exc:
            raise os_error(exc, parent) from None
    elif not os.path.isdir(parent):
        if os.path.exists(parent):
            raise AgentError("not_a_directory", f"{parent}: not a directory")
        raise AgentError("not_found", f"{parent}: no such directory")
    return real


class AtomicWriter:
    """Writes a temp file next to the target and renames it over the target at the end.

    A replaced file keeps its mode and owner; a new one gets ``owner`` (the
    default user's, when the agent runs as root) and mode 0644.
    """

    def __init__(self, path: str, mode: int | None, parents: bool,
                 owner: tuple[int, int] | None = None) -> None:
        self.path = path
        self.target = _resolve_target(path, parents, owner)
        try:
            st = os.stat(self.target)
        except OSError:
            st = None
        if mode is None:
            mode = stat.S_IMODE(st.st_mode) if st is not None else 0o644
        self.mode = mode
        self.owner = (st.st_uid, st.st_gid) if st is not None and os.geteuid() == 0 else owner
        directory, name = posixpath.split(self.target)
        self.tmp = posixpath.join(directory, f".{name}.{secrets.token_hex(4)}.dovecote-tmp")
        try:
            self.fd: int | None = os.open(
                self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise os_error(exc, path) from None
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            raise os_error(exc, self.path) from None
        self.size += len(data)

    def commit(self) -> P.FileEntry:
        assert self.fd is not None
        try:
            if self.owner is not None:
                os.fchown(self.fd, *self.owner)
            os.fchmod(self.fd, self.mode)
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp, self.target)
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.path) from None
        return file_entry(self.path if self.target == self.path else self.target)

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def write_file(path: str, data: bytes, mode: int | None, parents: bool,
               owner: tuple[int, int] | None = None) -> P.FileEntry:
    writer = AtomicWriter(path, mode, parents, owner)
    try:
        writer.write(data)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def open_for_read(path: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except IsADirectoryError:
        raise AgentError("is_a_directory", f"{path}: is a directory") from None
    except OSError as exc:
        raise os_error(exc, path) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise AgentError("is_a_directory", f"{path}: is a directory")
    return fd, st


def read_small(path: str) -> P.FileData:
    fd, st = open_for_read(path)
    try:
        if st.st_size > P.MAX_INLINE_FILE:
            raise AgentError(
                "too_large", f"{path}: {st.st_size} bytes; use ReadFileStream above {P.MAX_INLINE_FILE}"
            )
        parts = []
        total = 0
        while True:
            data = os.read(fd, READ_SIZE)
            if not data:
                break
            total += len(data)
            if total > P.MAX_INLINE_FILE:
                raise AgentError("too_large", f"{path}: grew past {P.MAX_INLINE_FILE} bytes")
            parts.append(data)
    finally:
        os.close(fd)
    return P.FileData(id=0, data=b"".join(parts), entry=file_entry(path))


def make_dir(path: str, parents: bool, mode: int, owner: tuple[int, int] | None = None) -> P.FileEntry:
    if os.path.lexists(path):
        if os.path.isdir(path):
            raise AgentError("already_exists", f"{path}: a directory already exists")
        raise AgentError("already_exists", f"{path}: a file already exists")
    try:
        if parents:
            _makedirs(path, mode, owner)
        else:
            os.mkdir(path, mode)
            if owner is not None:
                os.chown(path, *owner)
    except FileExistsError:
        raise AgentError("not_a_directory", f"{path}: a parent is not a directory") from None
    except OSError as exc:
        raise os_error(exc, path) from None
    return file_entry(path)


def remove_path(path: str) -> None:
    if path == "/":
        raise AgentError("invalid_path", "refusing to remove /")
    st = _lstat_or_error(path)
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError as exc:
        raise os_error(exc, path) from None


# ------------------------------------------------------------------ output ring


class OutputRing:
    """Bounded output of one process: (offset, channel, bytes) pieces, oldest dropped first."""

    MERGE = 64 * 1024

    def __init__(self, limit: int = RING_BYTES) -> None:
        self.limit = limit
        self.pieces: deque[list[Any]] = deque()  # [offset, channel, bytearray]
        self.start = 0  # offset of the oldest byte held
        self.end = 0  # offset just past the newest byte
        self.size = 0
        self.closed = False
        self._event = asyncio.Event()

    def append(self, channel: str, data: bytes) -> None:
        if not data:
            return
        last = self.pieces[-1] if self.pieces else None
        if last is not None and last[1] == channel and len(last[2]) < self.MERGE:
            last[2] += data
        else:
            self.pieces.append([self.end, channel, bytearray(data)])
        self.end += len(data)
        self.size += len(data)
        while self.size > self.limit:
            first = self.pieces[0]
            excess = self.size - self.limit
            if len(first[2]) <= excess:
                self.pieces.popleft()
                self.size -= len(first[2])
            else:
                del first[2][:excess]
                first[0] += excess
                self.size -= excess
        self.start = self.pieces[0][0] if self.pieces else self.end
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def read(self, offset: int, max_bytes: int) -> tuple[int, int, str, bytes] | None:
        """(skipped, offset, channel, data) from ``offset`` on, or None if nothing new."""
        skipped = 0
        if offset < self.start:
            skipped = self.start - offset
            offset = self.start
        for piece_offset, channel, data in self.pieces:
            if piece_offset + len(data) <= offset:
                continue
            begin = offset - piece_offset
            return skipped, offset, channel, bytes(data[begin : begin + max_bytes])
        return None

    async def wait(self, offset: int) -> None:
        while self.end <= offset and not self.closed:
            await self._event.wait()


# ------------------------------------------------------------------ processes


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _set_controlling_tty() -> None:  # runs in the child, after setsid and dup2
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Managed:
    """A background process or a PTY the agent started."""

    def __init__(self, kind: str, tag: str, argv: list[str], cmd: str, args: list[str]) -> None:
        self.kind = kind
        self.tag = tag
        self.argv = argv
        self.cmd = cmd
        self.args = args
        self.pid = 0
        self.started_at = time.time()
        self.ring = OutputRing()
        self.exit_code: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.master_fd: int | None = None
        self.input_lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self.exit_code is None

    def info(self) -> P.ProcessInfo:
        return P.ProcessInfo(
            pid=self.pid,
            tag=self.tag,
            cmd=self.cmd,
            args=self.args,
            kind=self.kind,
            running=self.running,
            exit_code=self.exit_code,
            started_at=self.started_at,
        )

    def signal(self, signum: int) -> bool:
        if not self.running:
            return False
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                return False
        return True


def _argv(cmd: str, args: list[str] | None) -> list[str]:
    if not cmd:
        raise AgentError("invalid_argument", "cmd is empty")
    return ["/bin/sh", "-c", cmd] if args is None else [cmd, *args]


def _valid_tag(tag: str) -> str:
    if not tag or len(tag) > 128 or tag.isdigit() or any(c.isspace() for c in tag):
        raise AgentError("invalid_argument", f"bad tag {tag!r}: 1-128 characters, no spaces, not all digits")
    return tag


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def _system_processes(skip: set[int]) -> list[P.ProcessInfo]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if not argv:
            continue  # kernel thread
        out.append(
            P.ProcessInfo(pid=int(name), tag=None, cmd=argv[0], args=argv[1:], kind="system", running=True)
        )
    return out


class Agent:
    def __init__(self, config: argparse.Namespace) -> None:
        self.config = config
        self.started = time.monotonic()
        self.managed: list[Managed] = []
        self.identity_env: dict[str, str] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self._warned_default_user = False

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ----- lookup

    def find(self, selector: str, kind: str | None = None) -> Managed | None:
        candidates = [m for m in self.managed if kind is None or m.kind == kind]
        if selector.isdigit():
            pid = int(selector)
            matches = [m for m in candidates if m.pid == pid]
        else:
            matches = [m for m in candidates if m.tag == selector]
        running = [m for m in matches if m.running]
        if running:
            return running[-1]
        return matches[-1] if matches else None

    def _register(self, m: Managed) -> None:
        if any(x.tag == m.tag and x.running for x in self.managed):
            raise AgentError("already_exists", f"tag {m.tag!r} is in use by a running process")
        self.managed = [x for x in self.managed if x.tag != m.tag]
        self.managed.append(m)
        exited = [x for x in self.managed if not x.running]
        for old in exited[: max(0, len(exited) - RETAIN_EXITED)]:
            self.managed.remove(old)

    # ----- environment

    def default_account(self) -> pwd.struct_passwd | None:
        """The account of ``--default-user`` (None when unset or missing: the agent's own)."""
        name = self.config.default_user
        if not name:
            return None
        try:
            return pwd.getpwnam(name)
        except KeyError:
            if not self._warned_default_user:
                log.warning("default user %r does not exist; running as the agent's user", name)
                self._warned_default_user = True
            return None

    def default_owner(self) -> tuple[int, int] | None:
        """(uid, gid) that files and directories the agent creates get, or None to keep its own."""
        pw = self.default_account()
        if pw is None or os.geteuid() != 0 or pw.pw_uid == os.geteuid():
            return None
        return pw.pw_uid, pw.pw_gid

    def env_for(
        self, extra: dict[str, str] | None, pw: pwd.struct_passwd | None, defaults: dict[str, str]
    ) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        for key, value in defaults.items():
            env.setdefault(key, value)
        if pw is not None:
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell or "/bin/sh")
        env.update(self.identity_env)
        env.update(extra or {})
        return env

    def spawn_kwargs(
        self,
        env: dict[str, str] | None,
        cwd: str | None,
        user: str | None,
        defaults: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Who runs a process and where: ``user`` (default: ``--default-user``), in ``cwd``
        (default: that user's home, else ``/``)."""
        kwargs: dict[str, Any] = {"start_new_session": True}
        if user is not None:
            try:
                pw: pwd.struct_passwd | None = pwd.getpwnam(user)
            except KeyError:
                raise AgentError("not_found", f"no such user {user!r}") from None
        else:
            pw = self.default_account()
        if pw is not None:
            if pw.pw_uid != os.getuid():
                kwargs.update(user=pw.pw_uid, group=pw.pw_gid,
                              extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid))
            if cwd is None:
                cwd = pw.pw_dir if os.path.isdir(pw.pw_dir) else "/"
        if cwd is not None:
            cwd = check_path(cwd)
            if not os.path.isdir(cwd):
                if os.path.exists(cwd):
                    raise AgentError("not_a_directory", f"cwd {cwd}: not a directory")
                raise AgentError("invalid_argument", f"cwd {cwd}: no such directory")
        kwargs["cwd"] = cwd
        kwargs["env"] = self.env_for(env, pw, defaults or {})
        return kwargs

    async def _create(self, argv: list[str], **kwargs: Any) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(*argv, **kwargs)
        except FileNotFoundError:
            raise AgentError("not_found", f"command not found: {argv[0]}") from None
        except PermissionError as exc:
            raise AgentError("permission_denied", f"{argv[0]}: {exc.strerror}") from None
        except OSError as exc:
            raise os_error(exc, argv[0]) from None

    # ----- foreground exec

    async def exec(self, req: P.Exec) -> P.ExecResult:
        argv = _argv(req.cmd, req.args)
        kwargs = self.spawn_kwargs(req.env, req.cwd, req.user)
        started = time.monotonic()
        proc = await self._create(
            argv,
            stdin=asyncio.subprocess.PIPE if req.stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            **kwargs,
        )
        bufs = {"stdout": bytearray(), "stderr": bytearray()}
        truncated = False

        async def collect(name: str, stream: asyncio.StreamReader) -> None:
            nonlocal truncated
            buf = bufs[name]
            while data := await stream.read(READ_SIZE):
                room = P.MAX_EXEC_OUTPUT - len(buf)
                if len(data) > room:
                    truncated = True
                buf += data[: max(0, room)]

        async def feed(data: bytes) -> None:
            assert proc.stdin is not None
            with contextlib.suppress(ConnectionError):
                proc.stdin.write(data)
                await proc.stdin.drain()
                proc.stdin.close()

        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.ensure_future(collect("stdout", proc.stdout)),
            asyncio.ensure_future(collect("stderr", proc.stderr)),
        ]
        if req.stdin:
            readers.append(asyncio.ensure_future(feed(req.stdin)))
        timed_out = False
        try:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=max(0.0, req.timeout_sec))
            except TimeoutError:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            # Output ends with the process unless a child it left behind holds the pipes.
            _, pending = await asyncio.wait(readers, timeout=1.0)
            for task in pending:
                task.cancel()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for task in readers:
                task.cancel()
            raise
        assert proc.returncode is not None
        out, err = bytes(bufs["stdout"]), bytes(bufs["stderr"])
        try:
            stdout, stderr, encoding = out.decode("utf-8"), err.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            stdout, stderr = base64.b64encode(out).decode(), base64.b64encode(err).decode()
            encoding = "base64"
        return P.ExecResult(
            id=req.id,
            stdout=stdout,
            stderr=stderr,
            exit_code=exit_status(proc.returncode),
            duration_ms=int((time.monotonic() - started) * 1000),
            encoding=encoding,
            timed_out=timed_out,
            truncated=truncated,
        )

    # ----- background processes

    async def start_process(self, req: P.StartProcess) -> P.ProcessStarted:
        argv = _argv(req.cmd, req.args)
        tag = _valid_tag(req.tag) if req.tag is not None else f"proc-{secrets.token_hex(4)}"
        if any(m.tag == tag and m.running for m in self.managed):
            raise AgentError("already_exists", f"tag {tag!r} is in use by a running process")
        kwargs = self.spawn_kwargs(req.env, req.cwd, req.user)
        m = Managed("process", tag, argv, req.cmd, list(req.args or []))
        proc = await self._create(
            argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            **kwargs,
        )
        m.proc, m.pid = proc, proc.pid
        self._register(m)
        self.spawn(self._watch_process(m, proc))
        return P.ProcessStarted(id=req.id, pid=m.pid, tag=tag, cmd=m.cmd, args=m.args)

    async def _watch_process(self, m: Managed, proc: asyncio.subprocess.Process) -> None:
        async def pump(channel: str, stream: asyncio.StreamReader) -> None:
            while data := await stream.read(READ_SIZE):
                m.ring.append(channel, data)

        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.ensure_future(pump("stdout", proc.stdout)),
            asyncio.ensure_future(pump("stderr", proc.stderr)),
        ]
        try:
            returncode = await proc.wait()
            _, pending = await asyncio.wait(pumps, timeout=1.0)
            for task in pending:
                task.cancel()
        finally:
            for task in pumps:
                task.cancel()
        m.exit_code = exit_status(returncode)
        m.ring.close()

    def list_processes(self, req: P.ListProcesses) -> P.ProcessList:
        infos = [m.info() for m in self.managed]
        if req.include_system:
            skip = {m.pid for m in self.managed if m.running}
            infos += _system_processes(skip)
        return P.ProcessList(id=req.id, processes=infos)

    def kill(self, req: P.KillProcess) -> P.Killed:
        signum = signal.SIGTERM if req.signal == "SIGTERM" else signal.SIGKILL
        m = self.find(req.selector)
        if m is not None:
            return P.Killed(id=req.id, pid=m.pid, tag=m.tag, delivered=m.signal(signum))
        if not req.selector.isdigit():
            raise AgentError("not_found", f"no process with tag {req.selector!r}")
        pid = int(req.selector)
        if pid in (0, 1, os.getpid()):
            raise AgentError("permission_denied", f"refusing to signal pid {pid}")
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            raise AgentError("not_found", f"no process {pid}") from None
        except PermissionError:
            raise AgentError("permission_denied", f"not allowed to signal pid {pid}") from None
        return P.Killed(id=req.id, pid=pid, tag=None, delivered=True)

    # ----- PTYs

    async def open_pty(self, req: P.OpenPty) -> Managed:
        tag = _valid_tag(req.tag) if req.tag is not None else f"pty-{secrets.token_hex(4)}"
        if any(m.tag == tag and m.running for m in self.managed):
            raise AgentError("already_exists", f"tag {tag!r} is in use by a running process")
        argv = _argv(req.cmd or "/bin/bash", list(req.args or []))
        kwargs = self.spawn_kwargs(req.env, req.cwd, req.user, defaults={"TERM": "xterm-256color"})
        master, slave = os.openpty()
        try:
            _set_winsize(master, req.cols, req.rows)
            m = Managed("pty", tag, argv, argv[0], argv[1:])
            proc = await self._create(
                argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=_set_controlling_tty, **kwargs
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        m.proc, m.pid, m.master_fd = proc, proc.pid, master
        self._register(m)
        self.spawn(self._watch_pty(m, proc, master))
        return m

    async def _watch_pty(self, m: Managed, proc: asyncio.subprocess.Process, master: int) -> None:
        loop = asyncio.get_running_loop()
        eof = asyncio.Event()

        def readable() -> None:
            while True:
                try:
                    data = os.read(master, READ_SIZE)
                except BlockingIOError:
                    return
                except OSError:  # EIO: every slave end is closed
                    data = b""
                if not data:
                    loop.remove_reader(master)
                    eof.set()
                    return
                m.ring.append("", data)

        loop.add_reader(master, readable)
        try:
            returncode = await proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(eof.wait(), timeout=1.0)
        finally:
            loop.remove_reader(master)
            m.master_fd = None
            os.close(master)
        m.exit_code = exit_status(returncode)
        m.ring.close()

    def pty(self, tag: str) -> Managed:
        m = self.find(tag, kind="pty")
        if m is None:
            raise AgentError("not_found", f"no PTY with tag {tag!r}")
        return m

    async def pty_input(self, req: P.PtyInput) -> P.Done:
        m = self.pty(req.tag)
        if len(req.data) > P.MAX_CHUNK:
            raise AgentError("too_large", f"PTY input over {P.MAX_CHUNK} bytes")
        loop = asyncio.get_running_loop()
        async with m.input_lock:
            view = memoryview(req.data)
            while view:
                fd = m.master_fd
                if fd is None or not m.running:
                    raise AgentError("not_running", f"PTY {req.tag!r} has exited")
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    ready: asyncio.Future[None] = loop.create_future()
                    loop.add_writer(fd, _resolve, ready)
                    try:
                        await asyncio.wait_for(ready, timeout=1.0)
                    except TimeoutError:
                        pass
                    finally:
                        loop.remove_writer(fd)
                except OSError as exc:
                    raise AgentError("not_running", f"PTY {req.tag!r}: {exc.strerror}") from None
        return P.Done(id=req.id)

    def pty_resize(self, req: P.PtyResize) -> P.Done:
        m = self.pty(req.tag)
        if not (1 <= req.cols <= 10000 and 1 <= req.rows <= 10000):
            raise AgentError("invalid_argument", f"bad size {req.cols}x{req.rows}")
        if m.master_fd is None or not m.running:
            raise AgentError("not_running", f"PTY {req.tag!r} has exited")
        _set_winsize(m.master_fd, req.cols, req.rows)
        return P.Done(id=req.id)

    # ----- identity

    def set_identity(self, req: P.SetIdentity) -> P.IdentitySet:
        steps: list[P.StepResult] = []
        system = not self.config.no_system_changes

        def step(name: str, fn: Callable[[], str | None]) -> None:
            try:
                detail = fn() or ""
                status = "skipped" if detail.startswith("skipped") else "ok"
                steps.append(P.StepResult(step=name, status=status, detail=detail))
            except Exception as exc:  # best effort: report and go on
                steps.append(P.StepResult(step=name, status="error", detail=f"{type(exc).__name__}: {exc}"))

        if req.hostname is not None:
            hostname = req.hostname

            def set_hostname() -> str | None:
                if not hostname or len(hostname) > 64 or not all(c.isalnum() or c in "-." for c in hostname):
                    raise ValueError(f"bad hostname {hostname!r}")
                _write_text(self.config.hostname_path, hostname + "\n")
                if not system:
                    return "skipped sethostname (--no-system-changes); file written"
                socket.sethostname(hostname)
                _set_hosts_name(self.config.hosts_path, hostname)
                return None

            step("hostname", set_hostname)
        if req.machine_id is not None:
            machine_id = req.machine_id

            def set_machine_id() -> str | None:
                if len(machine_id) != 32 or any(c not in "0123456789abcdef" for c in machine_id):
                    raise ValueError("machine_id must be 32 lowercase hex digits")
                if not os.access(posixpath.dirname(self.config.machine_id_path), os.W_OK):
                    return f"skipped: {self.config.machine_id_path} is not writable"
                _write_text(self.config.machine_id_path, machine_id + "\n")
                return None

            step("machine_id", set_machine_id)
        if req.env is not None:
            env = req.env

            def set_env() -> str:
                for key in env:
                    if not key or "=" in key or "\0" in key:
                        raise ValueError(f"bad variable name {key!r}")
                self.identity_env.update(env)
                return f"{len(env)} variables"

            step("env", set_env)
        if req.rng_seed is not None:
            seed = req.rng_seed

            def seed_rng() -> str:
                with open("/dev/urandom", "wb") as f:
                    f.write(seed)
                return f"{len(seed)} bytes mixed in"

            step("rng_seed", seed_rng)
        if req.clock_unix_ns is not None:
            ns = req.clock_unix_ns

            def set_clock() -> str | None:
                if not system:
                    return "skipped (--no-system-changes)"
                time.clock_settime_ns(time.CLOCK_REALTIME, ns)
                return None

            step("clock", set_clock)
        return P.IdentitySet(id=req.id, steps=steps)

    def pong(self, req: P.Ping) -> P.Pong:
        total, used = _disk_usage("/")
        return P.Pong(
            id=req.id,
            agent_version=AGENT_VERSION,
            protocol=P.PROTOCOL_VERSION,
            boot_id=_boot_id(),
            uptime=_uptime(),
            agent_uptime=time.monotonic() - self.started,
            agent_pid=os.getpid(),
            disk_total_bytes=total,
            disk_used_bytes=used,
        )

    def shutdown(self) -> None:
        for m in self.managed:
            m.signal(signal.SIGKILL)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.dovecote-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _set_hosts_name(path: str, hostname: str) -> None:
    """Point ``127.0.1.1`` at ``hostname`` in the hosts file, so the name resolves
    without DNS (sudo and friends look it up)."""
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if not line.startswith("127.0.1.1")]
    except FileNotFoundError:
        lines = ["127.0.0.1\tlocalhost"]
    lines.insert(1 if lines else 0, f"127.0.1.1\t{hostname}")
    _write_text(path, "\n".join(lines) + "\n")


def _disk_usage(path: str = "/") -> tuple[int, int]:
    """(size, used) of the filesystem holding ``path``, in bytes, as ``df`` counts them."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0, 0
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


# ------------------------------------------------------------------ channel


class FdChannel:
    """Blocking-with-timeout read/write on one non-blocking fd (socket or character device)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.stopped = threading.Event()
        os.set_blocking(fd, False)

    def stop(self) -> None:
        self.stopped.set()

    def read(self) -> bytes:
        """Next bytes, or b"" at EOF / when the host end is not connected / after stop()."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLPRI)
        while not self.stopped.is_set():
            events = poller.poll(POLL_MS)
            if not events:
                continue
            revents = events[0][1]
            if revents & (select.POLLIN | select.POLLPRI):
                try:
                    return os.read(self.fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:  # EIO and friends: the host side went away
                    return b""
            if revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return b""
        return b""

    def write(self, data: bytes) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        view = memoryview(data)
        while view:
            if self.stopped.is_set():
                raise ConnectionError("channel stopped")
            try:
                view = view[os.write(self.fd, view) :]
                continue
            except BlockingIOError:
                pass
            for _, revents in poller.poll(POLL_MS):
                if (
                    revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
                    and not revents & select.POLLOUT
                ):
                    raise ConnectionError("host end disconnected")


class OutStream:
    """Agent → host stream with the host's credits."""

    def __init__(self, session: Session, stream: int, window: int) -> None:
        self.session = session
        self.stream = stream
        self.window = P.SendWindow(max(1, min(window, P.MAX_WINDOW)))
        self._credit = asyncio.Event()

    def grant(self, credits: int) -> None:
        self.window.grant(credits)
        self._credit.set()

    async def wait_credit(self) -> None:
        while not self.window.can_send():
            self._credit.clear()
            await self._credit.wait()

    async def chunk(self, data: bytes, **fields: Any) -> None:
        await self.wait_credit()
        seq = self.window.take()
        await self.session.send(P.Chunk(stream=self.stream, seq=seq, data=data, **fields))

    async def end(self, exit_code: int | None = None, error: P.ErrorInfo | None = None) -> None:
        await self.session.send(
            P.StreamEnd(stream=self.stream, seq=self.window.next_seq, exit_code=exit_code, error=error)
        )


class Session:
    """One host connection."""

    def __init__(self, agent: Agent, fd: int) -> None:
        self.agent = agent
        self.channel = FdChannel(fd)
        self.decoder = P.FrameDecoder()
        self.out: asyncio.Queue[bytes] = asyncio.Queue(maxsize=32)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.streams: dict[int, OutStream] = {}
        self.stream_tasks: dict[int, asyncio.Task[Any]] = {}
        self.uploads: dict[int, asyncio.Queue[P.Chunk | P.StreamEnd | None]] = {}
        self.received = 0

    async def send(self, message: P.Message) -> None:
        await self.out.put(P.encode_frame(message))

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def run(self) -> int:
        """Serve until EOF or a protocol error; return the number of bytes received."""
        loop = asyncio.get_running_loop()
        reader = ThreadPoolExecutor(1, thread_name_prefix="agent-read")
        writer_pool = ThreadPoolExecutor(1, thread_name_prefix="agent-write")

        async def write_loop() -> None:
            try:
                while True:
                    data = await self.out.get()
                    await loop.run_in_executor(writer_pool, self.channel.write, data)
            except (ConnectionError, OSError) as exc:
                log.info("session write failed: %s", exc)
                self.channel.stop()

        writer = asyncio.ensure_future(write_loop())
        try:
            while True:
                data = await loop.run_in_executor(reader, self.channel.read)
                if not data:
                    break
                self.received += len(data)
                for body in self.decoder.feed(data):
                    self.dispatch(P.decode_host_message(body))
        except P.ProtocolError as exc:
            log.warning("protocol error, dropping the session: %s", exc)
        finally:
            self.channel.stop()
            for task in [*self.tasks, writer]:
                task.cancel()
            await asyncio.gather(*self.tasks, writer, return_exceptions=True)
            reader.shutdown(wait=False)
            writer_pool.shutdown(wait=False)
        return self.received

    def dispatch(self, msg: P.HostMessage) -> None:
        if isinstance(msg, P.Credit):
            stream = self.streams.get(msg.stream)
            if stream is not None:
                stream.grant(msg.credits)
        elif isinstance(msg, P.Cancel):
            task = self.stream_tasks.get(msg.stream)
            if task is not None:
                task.cancel()
            upload = self.uploads.get(msg.stream)
            if upload is not None:
                upload.put_nowait(None)
        elif isinstance(msg, (P.Chunk, P.StreamEnd)):
            queue = self.uploads.get(msg.stream)
            if queue is not None:  # else: an upload that already failed; drop
                queue.put_nowait(msg)
        else:
            self.spawn(self.handle(msg))

    async def handle(self, req: P.Request) -> None:
        try:
            reply = await self.answer(req)
        except AgentError as exc:
            reply = P.ErrorReply(id=req.id, code=exc.code, message=exc.message)
        except P.ProtocolError as exc:
            reply = P.ErrorReply(id=req.id, code="protocol_error", message=str(exc))
        except OSError as exc:
            err = os_error(exc)
            reply = P.ErrorReply(id=req.id, code=err.code, message=err.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s failed", type(req).__name__)
            reply = P.ErrorReply(id=req.id, code="internal", message=f"{type(exc).__name__}: {exc}")
        if reply is not None:
            await self.send(reply)

    async def answer(self, req: P.Request) -> P.Reply | None:
        agent = self.agent
        if isinstance(req, P.Ping):
            return agent.pong(req)
        if isinstance(req, P.SetIdentity):
            return await asyncio.to_thread(agent.set_identity, req)
        if isinstance(req, P.Exec):
            return await agent.exec(req)
        if isinstance(req, P.StartProcess):
            return await agent.start_process(req)
        if isinstance(req, P.ListProcesses):
            return await asyncio.to_thread(agent.list_processes, req)
        if isinstance(req, P.KillProcess):
            return agent.kill(req)
        if isinstance(req, P.StreamProcess):
            m = agent.find(req.selector)
            if m is None:
                raise AgentError("not_found", f"no process {req.selector!r}")
            await self.follow(req.id, m, req.since, req.window)
            return None
        if isinstance(req, P.OpenPty):
            m = await agent.open_pty(req)
            await self.follow(req.id, m, 0, req.window)
            return None
        if isinstance(req, P.AttachPty):
            await self.follow(req.id, agent.pty(req.tag), req.since, req.window)
            return None
        if isinstance(req, P.PtyInput):
            return await agent.pty_input(req)
        if isinstance(req, P.PtyResize):
            return agent.pty_resize(req)
        if isinstance(req, P.WriteFile):
            path = check_path(req.path)
            if len(req.data) > P.MAX_INLINE_FILE:
                raise AgentError("too_large", f"inline write over {P.MAX_INLINE_FILE} bytes")
            entry = await asyncio.to_thread(write_file, path, req.data, req.mode, req.parents,
                                            agent.default_owner())
            return P.FileWritten(id=req.id, entry=entry)
        if isinstance(req, P.WriteFileStream):
            return await self.receive_file(req)
        if isinstance(req, P.ReadFile):
            data = await asyncio.to_thread(read_small, check_path(req.path))
            data.id = req.id
            return data
        if isinstance(req, P.ReadFileStream):
            await self.send_file(req)
            return None
        if isinstance(req, P.ListDir):
            entries, truncated = await asyncio.to_thread(
                list_dir, check_path(req.path), req.depth, max(1, req.max_entries)
            )
            return P.DirListing(id=req.id, entries=entries, truncated=truncated)
        if isinstance(req, P.MakeDir):
            entry = await asyncio.to_thread(make_dir, check_path(req.path), req.parents, req.mode,
                                            agent.default_owner())
            return P.DirMade(id=req.id, entry=entry)
        if isinstance(req, P.Remove):
            await asyncio.to_thread(remove_path, check_path(req.path))
            return P.Done(id=req.id)
        if isinstance(req, P.Stat):
            path = check_path(req.path)
            st = await asyncio.to_thread(_lstat_or_error, path)
            return P.StatResult(id=req.id, entry=file_entry(path, st))
        raise AgentError("invalid_argument", f"unknown request {type(req).__name__}")

    # ----- streams

    def _open_stream(self, stream_id: int, window: int) -> OutStream:
        if stream_id in self.streams or stream_id in self.uploads:
            raise AgentError("invalid_argument", f"stream {stream_id} is already open")
        stream = OutStream(self, stream_id, window)
        self.streams[stream_id] = stream
        task = asyncio.current_task()
        assert task is not None
        self.stream_tasks[stream_id] = task
        return stream

    def _close_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.stream_tasks.pop(stream_id, None)

    async def follow(self, stream_id: int, m: Managed, since: int | None, window: int) -> None:
        """StreamStarted, then the ring from ``since`` (default: all it holds), then live output."""
        stream = self._open_stream(stream_id, window)
        try:
            offset = m.ring.start if since is None else max(0, since)
            await self.send(
                P.StreamStarted(id=stream_id, stream=stream_id, pid=m.pid, tag=m.tag, offset=offset)
            )
            while True:
                await stream.wait_credit()
                piece = m.ring.read(offset, P.CHUNK_SIZE)
                if piece is not None:
                    skipped, at, channel, data = piece
                    await stream.chunk(data, channel=channel, offset=at, skipped=skipped)
                    offset = at + len(data)
                elif m.ring.closed:
                    await stream.end(exit_code=m.exit_code)
                    return
                else:
                    await m.ring.wait(offset)
        except asyncio.CancelledError:
            if stream_id in self.streams and not self.channel.stopped.is_set():
                # Cancelled by the host (Cancel): close the stream politely.
                await self.send(P.StreamEnd(stream=stream_id, seq=stream.window.next_seq))
            else:
                raise
        finally:
            self._close_stream(stream_id)

    async def send_file(self, req: P.ReadFileStream) -> None:
        path = check_path(req.path)
        fd, st = await asyncio.to_thread(open_for_read, path)
        size = min(max(1, req.chunk_size), P.MAX_CHUNK)
        try:
            stream = self._open_stream(req.id, req.window)
            try:
                await self.send(P.StreamStarted(id=req.id, stream=req.id, size=st.st_size))
                offset = 0
                while True:
                    await stream.wait_credit()
                    try:
                        data = await asyncio.to_thread(os.read, fd, size)
                    except OSError as exc:
                        err = os_error(exc, path)
                        await stream.end(error=P.ErrorInfo(code=err.code, message=err.message))
                        return
                    if not data:
                        await stream.end()
                        return
                    await stream.chunk(data, offset=offset)
                    offset += len(data)
            finally:
                self._close_stream(req.id)
        finally:
            os.close(fd)

    async def receive_file(self, req: P.WriteFileStream) -> P.FileWritten:
        path = check_path(req.path)
        if req.id in self.uploads or req.id in self.streams:
            raise AgentError("invalid_argument", f"stream {req.id} is already open")
        writer = await asyncio.to_thread(AtomicWriter, path, req.mode, req.parents,
                                         self.agent.default_owner())
        window = P.ReceiveWindow(max(1, min(req.window, P.MAX_WINDOW)))
        queue: asyncio.Queue[P.Chunk | P.StreamEnd | None] = asyncio.Queue()
        self.uploads[req.id] = queue
        committed = False
        try:
            await self.send(P.StreamReady(id=req.id, stream=req.id, credits=window.window))
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), timeout=UPLOAD_IDLE_TIMEOUT)
                except TimeoutError:
                    raise AgentError("io_error", f"upload idle for {UPLOAD_IDLE_TIMEOUT:.0f} s") from None
                if msg is None:
                    raise AgentError("io_error", "upload cancelled by the host")
                if isinstance(msg, P.StreamEnd):
                    window.end(msg.seq)
                    if msg.error is not None:
                        raise AgentError(msg.error.code, f"host aborted the upload: {msg.error.message}")
                    entry = await asyncio.to_thread(writer.commit)
                    committed = True
                    return P.FileWritten(id=req.id, entry=entry)
                window.receive(msg.seq)
                if len(msg.data) > P.MAX_CHUNK:
                    raise AgentError("too_large", f"chunk over {P.MAX_CHUNK} bytes")
                await asyncio.to_thread(writer.write, msg.data)
                await self.send(P.Credit(stream=req.id, credits=window.consumed(1)))
        finally:
            self.uploads.pop(req.id, None)
            if not committed:
                writer.abort()


# ------------------------------------------------------------------ serving


MAX_REOPEN_BACKOFF_S = 0.2
"""Longest wait between two opens of the port while no host is connected: a VM
restored from a template or resumed from a pause is served within this."""


async def serve_device(agent: Agent, path: str) -> None:
    backoff = 0.05
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            log.warning("cannot open %s: %s", path, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_REOPEN_BACKOFF_S)
            continue
        try:
            received = await Session(agent, fd).run()
        finally:
            os.close(fd)
        # EOF right away means the host end is not connected: back off; after a real
        # session, reopen quickly so a reconnecting host is served at once.
        backoff = 0.05 if received else min(backoff * 2, MAX_REOPEN_BACKOFF_S)
        await asyncio.sleep(backoff)


async def serve_unix(agent: Agent, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    log.info("listening on %s", path)
    await _serve_listener(agent, listener)


async def _serve_listener(agent: Agent, listener: socket.socket) -> None:
    """Accept host connections one at a time and serve each as a session."""
    listener.listen(4)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    with listener:
        while True:
            conn, _ = await loop.sock_accept(listener)
            with conn:
                log.info("host connected")
                await Session(agent, conn.fileno()).run()
                log.info("host disconnected")


async def serve_vsock(agent: Agent, port: int) -> None:
    """Serve one host connection at a time on vsock ``port`` (Cloud Hypervisor)."""
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    log.info("listening on vsock port %d", port)
    await _serve_listener(agent, listener)


async def main_async(config: argparse.Namespace) -> None:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if config.device:
        server = asyncio.ensure_future(serve_device(agent, config.device))
    elif config.listen_vsock is not None:
        server = asyncio.ensure_future(serve_vsock(agent, config.listen_vsock))
    else:
        server = asyncio.ensure_future(serve_unix(agent, config.listen_unix))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([server, stopper], return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()
    finally:
        server.cancel()
        stopper.cancel()
        if config.kill_on_exit:
            agent.shutdown()
        for task in list(agent.tasks):
            task.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Dovecote guest agent")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="virtio-serial character device")
    where.add_argument("--listen-unix", help="serve one connection at a time on this unix socket (tests)")
    where.add_argument("--listen-vsock", type=int, metavar="PORT",
                       help="serve one connection at a time on this vsock port (Cloud Hypervisor)")
    parser.add_argument("--machine-id-path", default="/etc/machine-id")
    parser.add_argument("--hostname-path", default="/etc/hostname")
    parser.add_argument("--hosts-path", default="/etc/hosts",
                        help="its 127.0.1.1 line follows the hostname (not with --no-system-changes)")
    parser.add_argument(
        "--default-user",
        default="",
        help="run processes and PTYs that name no user as this user, in its home; files and "
        "directories the agent creates belong to it",
    )
    parser.add_argument(
        "--no-system-changes",
        action="store_true",
        help="never set the hostname or the clock (tests on a host)",
    )
    parser.add_argument(
        "--kill-on-exit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SIGKILL the processes and PTYs the agent started when it stops",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(config))


if __name__ == "__main__":
    main()
