"""The host provider: headless Chromium on the host, in a bubblewrap sandbox (the fallback).

Off unless the operator sets ``DOVECOTE_BROWSER_HOST=true``, and reported as
weaker isolation than a VM: the browser shares the host's kernel. The sandbox
is the xvfb desktop provider's kind: ``setpriv`` to a dedicated unprivileged
host user (``DOVECOTE_BROWSER_HOST_USER``, created as a system user when the
service runs as root), then ``bwrap --unshare-all`` (own user, mount, PID,
network — loopback only —, IPC and UTS namespaces), ``/usr`` and ``/etc``
read-only, fresh tmpfs ``/tmp`` ``/run`` ``/var`` (the profile lives in the
sandbox's ``/tmp`` and vanishes with it), ``--die-with-parent`` (so it is
started by :func:`dovecote.libs.sandbox.open_process`, from a thread that lives
as long as the service).

The DevTools connection is Chromium's ``--remote-debugging-pipe``: commands
go in on fd 3, replies and events come out on fd 4, each message ended by a
NUL byte. Nothing listens on any socket, so no other process of the host can
reach the browser; the only way in is the service holding the pipe.

Chromium's stderr is read by :meth:`PipeConnection.keep_stderr` (a task of the
session) into a bounded tail (:data:`STDERR_TAIL`). When the browser goes on its
own (not killed by us), the connection waits briefly for the process, logs its
exit status (or signal) with the last lines of stderr, writes the tail to
``<data dir>/browsers/<session id>/chromium-stderr.log``, and the reason
(``the browser exited (killed by SIGKILL, 10.0 s after launch)``) becomes the
session's ``browser_exited`` message.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import trio

from dovecote.libs import sandbox
from dovecote.libs.logs import get_logger
from dovecote.libs.sandbox import SandboxUser

log = get_logger("dovecote.browsers.host")

ISOLATION = ("weaker: the host provider runs Chromium on the host kernel, in a bubblewrap "
             "sandbox (own user, mount, PID and network namespaces) as an unprivileged user")
MAX_MESSAGE = 64 * 1024 * 1024
"""Largest CDP message accepted from the browser (a full-page screenshot fits)."""
STDERR_TAIL = 64 * 1024
"""The last bytes of Chromium's stderr kept for a post-mortem."""
EXIT_WAIT_S = 5.0
"""How long a closed pipe waits for the process's status before it reports the browser gone."""


class BrowserGone(Exception):
    """The browser's pipe closed (the process died or was killed)."""


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_tools() -> list[str]:
    missing = [t for t in ("bwrap", "setpriv") if shutil.which(t) is None]
    if chromium_path() is None:
        missing.append("chromium")
    return missing


def ensure_user(name: str) -> SandboxUser:
    """The dedicated host user of the sandboxed browsers (``DOVECOTE_BROWSER_HOST_USER``)."""
    return sandbox.ensure_user(name, variable="DOVECOTE_BROWSER_HOST_USER")


def argv(user: SandboxUser, width: int, height: int, chromium: str) -> list[str]:
    """The sandboxed Chromium's command line (fds 3 and 4 are its DevTools pipe)."""
    return sandbox.argv(
        user, hostname="browser", binds=(), chdir="/tmp",
        env={"HOME": "/tmp", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"},
        command=[chromium, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
                 "--user-data-dir=/tmp/profile", "--no-first-run", "--no-default-browser-check",
                 "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars",
                 f"--window-size={width},{height}", "about:blank"])


class PipeConnection:
    """One CDP connection over Chromium's NUL-delimited pipe (and the tail of its stderr)."""

    def __init__(self, process: sandbox.SandboxProcess, to_browser: trio.lowlevel.FdStream,
                 from_browser: trio.lowlevel.FdStream, *, stderr: trio.lowlevel.FdStream | None = None,
                 session_id: str = "", stderr_log: Path | None = None) -> None:
        self.process = process
        self.session_id = session_id
        self.started = time.monotonic()
        self._out = to_browser
        self._in = from_browser
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self._stderr = stderr
        self._stderr_log = stderr_log
        self.stderr_tail = bytearray()
        self._stderr_done = trio.Event()
        self._closing = False
        self._gone: str | None = None

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._out.send_all(data + b"\0")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise BrowserGone(await self.exit_reason()) from exc

    async def receive(self) -> bytes:
        while True:
            end = self._buffer.find(b"\0")
            if end >= 0:
                message = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                return message
            if len(self._buffer) > MAX_MESSAGE:
                raise BrowserGone("a CDP message larger than the limit")
            try:
                chunk = await self._in.receive_some(1024 * 1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise BrowserGone(await self.exit_reason()) from exc
            if not chunk:
                raise BrowserGone(await self.exit_reason())
            self._buffer += chunk

    async def keep_stderr(self) -> None:
        """Read Chromium's stderr to its end, keeping the last :data:`STDERR_TAIL` bytes.

        Run it as a task of the session for as long as the browser lives: the pipe
        must be drained, or a chatty browser would block on writing to it.
        """
        if self._stderr is None:
            self._stderr_done.set()
            return
        try:
            while True:
                chunk = await self._stderr.receive_some(64 * 1024)
                if not chunk:
                    break
                self.stderr_tail += chunk
                if len(self.stderr_tail) > STDERR_TAIL:
                    del self.stderr_tail[:-STDERR_TAIL]
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._stderr_done.set()

    async def exit_reason(self) -> str:
        """Why the pipe closed: the process's exit status or signal (waited for at most
        :data:`EXIT_WAIT_S`). The first time, for a browser we did not close, it is logged
        with the end of stderr and the tail is written to the session's directory."""
        if self._gone is not None:
            return self._gone
        with trio.move_on_after(EXIT_WAIT_S):
            await self.process.wait()
        with trio.move_on_after(1):
            await self._stderr_done.wait()
        lived = time.monotonic() - self.started
        status = sandbox.describe_exit(self.process.returncode)
        self._gone = f"the browser exited ({status}, {lived:.1f} s after launch)"
        if not self._closing:
            await self._post_mortem(status, lived)
        return self._gone

    async def _post_mortem(self, status: str, lived: float) -> None:
        tail = bytes(self.stderr_tail)
        last_lines = tail.decode("utf-8", "replace").rstrip().splitlines()[-10:]
        written = None
        if self._stderr_log is not None and tail:
            try:
                path = self._stderr_log
                await trio.to_thread.run_sync(_write_private, path, tail)
                written = str(path)
            except OSError as exc:
                log.warning("browser stderr not written", extra={"session_id": self.session_id,
                                                                 "error": str(exc)})
        log.warning("browser exited", extra={
            "session_id": self.session_id, "pid": self.process.pid, "returncode": self.process.returncode,
            "status": status, "lived_s": round(lived, 1), "stderr_bytes": len(tail),
            "stderr_end": "\n".join(line[:300] for line in last_lines), "stderr_file": written})

    async def aclose(self) -> None:
        self._closing = True
        await self.process.aclose()
        for stream in (self._out, self._in, self._stderr):
            if stream is not None:
                await stream.aclose()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _high_pipe() -> tuple[int, int]:
    """A pipe whose ends are above 9, so the child's ``3<&`` and ``4>&`` never clobber them."""
    ends = []
    for fd in os.pipe():
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        ends.append(high)
    return ends[0], ends[1]


async def launch(user: SandboxUser, width: int, height: int, *, session_id: str = "",
                 stderr_log: Path | None = None) -> PipeConnection:
    """Start the sandboxed browser; its DevTools pipe. ``stderr_log`` is where the tail of its
    stderr goes if it exits on its own (see the module docstring)."""
    chromium = chromium_path()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed on the host (infra/system-deps.sh)")
    cmd_r, cmd_w = _high_pipe()
    out_r, out_w = _high_pipe()
    err_r, err_w = _high_pipe()
    try:
        # fds 3 and 4 in the child, whatever numbers the pipes got here.
        # (bash: dash refuses fd numbers above 9)
        shell = f'exec 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-; exec "$@"'
        # Forked by the sandbox's spawner thread, not a Trio worker: bwrap's --die-with-parent
        # follows the forking thread, and a Trio worker exits after 10 s without a job.
        process = await sandbox.open_process(
            ["/bin/bash", "-c", shell, "bash", *argv(user, width, height, chromium)],
            pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err_w, start_new_session=True)
    except BaseException:
        for fd in (cmd_r, cmd_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    for fd in (cmd_r, out_w, err_w):
        os.close(fd)
    return PipeConnection(process, trio.lowlevel.FdStream(cmd_w), trio.lowlevel.FdStream(out_r),
                          stderr=trio.lowlevel.FdStream(err_r), session_id=session_id,
                          stderr_log=stderr_log)
