"""Host sandboxes: bubblewrap under a dedicated unprivileged user.

The providers that run on the host instead of in a VM (the xvfb desktop, the
host browser) start their processes the same way: ``setpriv`` to a system user
made for them (no capabilities, no supplementary groups), then ``bwrap`` with
every namespace unshared, a read-only ``/usr`` and ``/etc``, fresh ``/proc``,
``/dev``, ``/tmp``, ``/run`` and ``/var``, a cleared environment, and what the
provider binds in. This is weaker isolation than a VM, and reported as such.

Start a sandbox with :func:`open_process`, not ``trio.lowlevel.open_process`` or
``trio.run_process``: ``--die-with-parent`` follows the *thread* that forked
bwrap, and Trio forks on worker threads that exit when idle (the comment above
:class:`_Spawner`).
"""

from __future__ import annotations

import os
import pwd
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import trio

SYSTEM = ("--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
          "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
          "--ro-bind", "/etc", "/etc")
"""The host's programs and configuration, read-only."""
SCRATCH = ("--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run",
           "--tmpfs", "/var", "--dir", "/var/tmp")
"""Fresh kernel views and empty writable directories."""


class RootSandboxUser(ValueError):
    """The configured sandbox user is root."""


@dataclass(frozen=True, kw_only=True)
class SandboxUser:
    name: str
    uid: int
    gid: int


def ensure_user(name: str, *, variable: str) -> SandboxUser:
    """The dedicated host user ``name`` (created as a system user when we are root), or our own
    user when we are not root.

    Raises:
        RootSandboxUser: ``name`` is root (``variable`` names the setting in the message).
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return SandboxUser(name=me.pw_name, uid=me.pw_uid, gid=me.pw_gid)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
        pw = pwd.getpwnam(name)
    if pw.pw_uid == 0:
        raise RootSandboxUser(f"{variable} {name!r} is root; choose an unprivileged user")
    return SandboxUser(name=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid)


def argv(user: SandboxUser, *, hostname: str, binds: Sequence[str], env: Mapping[str, str],
         chdir: str, command: Sequence[str]) -> list[str]:
    """The command line running ``command`` in a sandbox as ``user``: ``setpriv`` (when we are
    root), then ``bwrap`` with :data:`SYSTEM`, :data:`SCRATCH`, then ``binds`` (bubblewrap
    options, applied in order after them), the environment ``env`` only, in ``chdir``.
    Start it with :func:`open_process` (``--die-with-parent``)."""
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
           "--hostname", hostname, *SYSTEM, *SCRATCH, *binds, "--chdir", chdir]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    cmd += command
    if os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all", "--", *cmd]
    return cmd


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int | None) -> str:
    """A sandboxed process's end in words: ``exit status 1``, ``killed by SIGKILL`` (bwrap
    itself), ``exit status 137 (SIGKILL inside the sandbox)`` (bwrap reports a command killed
    by a signal as 128 + its number), or ``still running``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by {_signal_name(-returncode)}"
    if 128 < returncode < 128 + 65:
        return f"exit status {returncode} ({_signal_name(returncode - 128)} inside the sandbox)"
    return f"exit status {returncode}"


# -- starting a sandbox ---------------------------------------------------------------------
#
# ``--die-with-parent`` is ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in bwrap, and the kernel's
# "parent" there is the *thread* that forked it, not the process: the sandbox is killed when
# that thread exits. ``trio.lowlevel.open_process`` and ``trio.run_process`` fork from one of
# Trio's cached worker threads, which exits after 10 s without a job, so a sandbox started
# that way is SIGKILLed some time later, as soon as the worker that happened to fork it idles
# out (while the service keeps its threads busy it lives, so the death looked random). Every
# sandbox is therefore forked by one thread of our own that lives as long as the process
# (:func:`open_process`).


class _Spawner:
    """The one thread that forks every sandbox of this process (it never exits before the process)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen[bytes]],
                                            Future[subprocess.Popen[bytes]]]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="dovecote-sandbox-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    def submit(self, job: Callable[[], subprocess.Popen[bytes]]) -> Future[subprocess.Popen[bytes]]:
        future: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((job, future))
        return future


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _the_spawner() -> _Spawner:
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner.pid != os.getpid():  # a forked child has no such thread
            _spawner = _Spawner()
        return _spawner


class SandboxProcess:
    """A process started by :func:`open_process`: the parts of :class:`trio.Process` the
    providers use (``pid``, ``returncode``, ``wait()``, ``kill()``), its exit watched with a pidfd."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd: int | None = os.pidfd_open(popen.pid)  # a zombie has one too: it is not reaped yet
        self._wait_lock = trio.Lock()

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), or None while it runs."""
        result = self._popen.poll()
        if result is not None:
            self._close_pidfd()
        return result

    async def wait(self) -> int:
        """Wait for the process to exit; its status."""
        async with self._wait_lock:
            while (result := self.returncode) is None:
                assert self._pidfd is not None
                try:
                    await trio.lowlevel.wait_readable(self._pidfd)
                except trio.ClosedResourceError:  # another task saw it exit and closed the pidfd
                    pass
        return result

    def kill(self) -> None:
        """SIGKILL (nothing once it has exited and been reaped)."""
        self._popen.kill()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """SIGKILL it if it runs and reap it, waiting up to ``timeout_s`` even when the
        caller is cancelled (a sandbox is never left running behind a closed session)."""
        if self.returncode is None:
            self.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
            await self.wait()

    def _close_pidfd(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            try:
                trio.lowlevel.notify_closing(fd)  # wakes a waiter with ClosedResourceError
            except RuntimeError:  # outside Trio: nobody can be waiting on it
                pass
            os.close(fd)


async def open_process(command: Sequence[str], **options: Any) -> SandboxProcess:
    """Start ``command`` (a line from :func:`argv`) as :class:`subprocess.Popen` does with
    ``options``, forked by this process's spawner thread, so that ``--die-with-parent`` means
    "dies with this process" (see the comment above :class:`_Spawner`)."""
    def start() -> subprocess.Popen[bytes]:
        popen: subprocess.Popen[bytes] = subprocess.Popen(list(command), **options)
        return popen

    future = _the_spawner().submit(start)
    popen = await trio.to_thread.run_sync(future.result)  # not cancellable: the fork happens anyway
    return SandboxProcess(popen)
