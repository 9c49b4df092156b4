"""The host provider's sandboxed Chromium on its own: it lives as long as the service, and
when it goes, it says how.

Real bubblewrap, real Chromium, the real DevTools pipe; no service around them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import trio

from dovecote.libs import sandbox
from dovecote.services.browsers import host

pytestmark = pytest.mark.slow

THREAD_IDLE_S = 12
"""Longer than Trio's worker threads wait for a job before they exit (10 s)."""


@pytest.fixture(scope="module")
def user() -> sandbox.SandboxUser:
    for tool in ("bwrap", "setpriv", "chromium"):
        if shutil.which(tool) is None:
            pytest.fail(f"infra/system-deps.sh did not install {tool}")
    return host.ensure_user("dovecote-browser")


async def _version(conn: host.PipeConnection) -> dict[str, object]:
    await conn.send(json.dumps({"id": 1, "method": "Browser.getVersion"}).encode())
    with trio.fail_after(30):
        while True:
            message = json.loads(await conn.receive())
            if message.get("id") == 1:
                result: dict[str, object] = message["result"]
                return result


async def test_the_browser_outlives_the_thread_that_started_it(user: sandbox.SandboxUser) -> None:
    # bwrap's --die-with-parent follows the thread that forked it; a Trio worker thread exits
    # after 10 s without a job, and took the browser with it (the idle session's flake).
    with trio.fail_after(60):
        conn = await host.launch(user, 800, 600)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.keep_stderr)
            assert "Chrome" in str((await _version(conn))["product"])
            await trio.sleep(THREAD_IDLE_S)  # no thread job meanwhile: the forking worker idles out
            assert conn.process.returncode is None, sandbox.describe_exit(conn.process.returncode)
            assert "Chrome" in str((await _version(conn))["product"])
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()


async def test_a_browser_killed_from_outside_is_reported_with_its_signal(
        user: sandbox.SandboxUser, tmp_path: Path) -> None:
    stderr_log = tmp_path / "s1" / "chromium-stderr.log"
    with trio.fail_after(60):
        conn = await host.launch(user, 800, 600, session_id="s1", stderr_log=stderr_log)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.keep_stderr)
            await _version(conn)
            os.kill(conn.process.pid, signal.SIGKILL)  # bwrap: its PID namespace goes with it
            with trio.fail_after(15), pytest.raises(host.BrowserGone) as gone:
                while True:
                    await conn.receive()
            assert "killed by SIGKILL" in str(gone.value) and "after launch" in str(gone.value)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()


async def test_an_exit_of_its_own_keeps_the_tail_of_stderr(tmp_path: Path) -> None:
    # The connection's post-mortem with a process that writes more than the tail keeps, then fails.
    stderr_log = tmp_path / "s2" / "chromium-stderr.log"
    err_r, err_w = os.pipe()
    out_r, out_w = os.pipe()
    cmd_r, cmd_w = os.pipe()
    script = "head -c 100000 /dev/zero | tr '\\0' x >&2; echo 'FATAL: the last words' >&2; exit 3"
    process = await sandbox.open_process(["/bin/sh", "-c", script], stdout=out_w, stderr=err_w,
                                         stdin=cmd_r)
    for fd in (err_w, out_w, cmd_r):
        os.close(fd)
    conn = host.PipeConnection(process, trio.lowlevel.FdStream(cmd_w), trio.lowlevel.FdStream(out_r),
                               stderr=trio.lowlevel.FdStream(err_r), session_id="s2",
                               stderr_log=stderr_log)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.keep_stderr)
            with trio.fail_after(15), pytest.raises(host.BrowserGone) as gone:
                await conn.receive()
            assert "exit status 3" in str(gone.value)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()
    kept = stderr_log.read_bytes()
    assert len(kept) == host.STDERR_TAIL and kept.endswith(b"FATAL: the last words\n")
    assert stderr_log.stat().st_mode & 0o777 == 0o600


def test_exit_statuses_in_words() -> None:
    assert sandbox.describe_exit(None) == "still running"
    assert sandbox.describe_exit(0) == "exit status 0"
    assert sandbox.describe_exit(-9) == "killed by SIGKILL"
    assert sandbox.describe_exit(139) == "exit status 139 (SIGSEGV inside the sandbox)"
