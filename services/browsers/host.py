"""The host provider: headless Chromium on the host, in a bubblewrap sandbox (the fallback).

Off unless the operator sets ``DOVECOTE_BROWSER_HOST=true``, and reported as
weaker isolation than a VM: the browser shares the host's kernel. The sandbox
is the xvfb desktop provider's kind: ``setpriv`` to a dedicated unprivileged
host user (``DOVECOTE_BROWSER_HOST_USER``, created as a system user when the
service runs as root), then ``bwrap --unshare-all`` (own user, mount, PID,
network — loopback only —, IPC and UTS namespaces), ``/usr`` and ``/etc``
read-only, fresh tmpfs ``/tmp`` ``/run`` ``/var`` (the profile lives in the
sandbox's ``/tmp`` and vanishes with it), ``--die-with-parent``.

The DevTools connection is Chromium's ``--remote-debugging-pipe``: commands
go in on fd 3, replies and events come out on fd 4, each message ended by a
NUL byte. Nothing listens on any socket, so no other process of the host can
reach the browser; the only way in is the service holding the pipe.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess

import trio

from dovecote.libs import sandbox
from dovecote.libs.sandbox import SandboxUser

ISOLATION = ("weaker: the host provider runs Chromium on the host kernel, in a bubblewrap "
             "sandbox (own user, mount, PID and network namespaces) as an unprivileged user")
MAX_MESSAGE = 64 * 1024 * 1024
"""Largest CDP message accepted from the browser (a full-page screenshot fits)."""


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
    """One CDP connection over Chromium's NUL-delimited pipe."""

    def __init__(self, process: trio.Process, to_browser: trio.lowlevel.FdStream,
                 from_browser: trio.lowlevel.FdStream) -> None:
        self.process = process
        self._out = to_browser
        self._in = from_browser
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._out.send_all(data + b"\0")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise BrowserGone("the browser's pipe is closed") from exc

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
                raise BrowserGone("the browser's pipe is closed") from exc
            if not chunk:
                raise BrowserGone("the browser exited")
            self._buffer += chunk

    async def aclose(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        with trio.move_on_after(5):
            await self.process.wait()
        for stream in (self._out, self._in):
            await stream.aclose()


def _high_pipe() -> tuple[int, int]:
    """A pipe whose ends are above 9, so the child's ``3<&`` and ``4>&`` never clobber them."""
    ends = []
    for fd in os.pipe():
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        ends.append(high)
    return ends[0], ends[1]


async def launch(user: SandboxUser, width: int, height: int) -> PipeConnection:
    """Start the sandboxed browser; its DevTools pipe."""
    chromium = chromium_path()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed on the host (infra/system-deps.sh)")
    cmd_r, cmd_w = _high_pipe()
    out_r, out_w = _high_pipe()
    try:
        # fds 3 and 4 in the child, whatever numbers the pipes got here.
        # (bash: dash refuses fd numbers above 9)
        shell = f'exec 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-; exec "$@"'
        process = await trio.lowlevel.open_process(
            ["/bin/bash", "-c", shell, "bash", *argv(user, width, height, chromium)],
            pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        for fd in (cmd_r, cmd_w, out_r, out_w):
            os.close(fd)
        raise
    os.close(cmd_r)
    os.close(out_w)
    return PipeConnection(process, trio.lowlevel.FdStream(cmd_w), trio.lowlevel.FdStream(out_r))
