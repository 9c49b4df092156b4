"""The xvfb provider's sandbox process: it lives as long as the service, and goes with
its session.

Real bubblewrap with ``--die-with-parent``, as the provider starts it
(:mod:`dovecote.services.desktops.xvfb`): bwrap's parent-death signal follows the
*thread* that forked it, and a Trio worker thread exits after 10 s without a job, so a
sandbox forked by one died with it (the browsers' idle-session flake, the same start
path).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import trio

from dovecote.libs import sandbox
from dovecote.services.desktops.sessions import _run_quietly

THREAD_IDLE_S = 12
"""Longer than Trio's worker threads wait for a job before they exit (10 s)."""


def _bwrap_sleep() -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.fail("infra/system-deps.sh did not install bubblewrap")
    return [bwrap, "--die-with-parent", "--unshare-pid", "--ro-bind", "/", "/", "sleep", "600"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_the_sandbox_outlives_the_thread_that_started_it() -> None:
    async with trio.open_nursery() as nursery:
        proc: sandbox.SandboxProcess = await nursery.start(_run_quietly, _bwrap_sleep(), subprocess.DEVNULL)
        await trio.sleep(THREAD_IDLE_S)  # no thread job meanwhile: a forking worker would idle out
        assert proc.returncode is None, sandbox.describe_exit(proc.returncode)
        assert _alive(proc.pid)
        nursery.cancel_scope.cancel()
    # Cancelled: killed and reaped.
    assert proc.returncode is not None and proc.returncode < 0
    assert not _alive(proc.pid)


async def test_a_sandbox_that_exits_ends_its_task() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proc: sandbox.SandboxProcess = await nursery.start(
                _run_quietly, [*_bwrap_sleep()[:-2], "sh", "-c", "exit 3"], subprocess.DEVNULL)
    assert proc.returncode == 3
