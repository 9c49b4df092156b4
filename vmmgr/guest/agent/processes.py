"""Processes and PTYs the agent runs: foreground exec, background processes, PTYs.

:class:`Processes` holds the state that outlives a host connection: every
background process and PTY the agent started (:class:`Managed`), each with a
bounded :class:`OutputRing` that is read as fast as output comes (oldest output
dropped past the ring size; a reader is told how much it skipped), so the agent
never blocks on a slow host.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import logging
import os
import pwd
import secrets
import signal
import struct
import termios
import time
from collections import deque
from collections.abc import Awaitable
from typing import Any

from .. import protocol as P
from .errors import AgentError, os_error
from .files import READ_SIZE, check_path

RING_BYTES = 1024 * 1024
RETAIN_EXITED = 64

log = logging.getLogger("dovecote-agent")


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



def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Processes:
    """The processes and PTYs of one agent, and how it starts them."""

    def __init__(self, default_user: str) -> None:
        self.default_user = default_user
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
        name = self.default_user
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

    def shutdown(self) -> None:
        for m in self.managed:
            m.signal(signal.SIGKILL)
