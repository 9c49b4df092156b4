"""The real guest agent with ``--default-user``: who runs commands, where, and who owns new files.

The guest image runs its agent as root with ``--default-user wrenn-user``; here
the agent runs on the host (as root, like in the guest) with the host's
``nobody`` as default user, whose home does not exist.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from dovecote.vmmgr import guest
from dovecote.vmmgr.guest import open_agent
from dovecote.vmmgr.guest.errors import AgentRequestError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def nobody_agent() -> Iterator[tuple[str, Path]]:
    workdir = Path(tempfile.mkdtemp(prefix="dcu-", dir="/tmp"))
    workdir.chmod(0o755)
    etc = workdir / "etc"
    etc.mkdir()
    sock = str(workdir / "a.sock")
    with open(workdir / "agent.log", "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", guest.AGENT_MODULE, "--listen-unix", sock, "--no-system-changes",
             "--machine-id-path", str(etc / "machine-id"), "--hostname-path", str(etc / "hostname"),
             "--default-user", "nobody"],
            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield sock, workdir
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_commands_run_as_the_default_user_unless_another_is_named(
        nobody_agent: tuple[str, Path]) -> None:
    sock, workdir = nobody_agent
    nobody = pwd.getpwnam("nobody")
    async with open_agent(sock, connect_timeout=10) as client:
        with trio.fail_after(20):
            mine = await client.exec('id -un; echo "$HOME"; pwd')
            as_root = await client.exec('id -un; echo "$HOME"; pwd', user="root")
            in_dir = await client.exec("pwd", cwd=str(workdir))
            started = await client.start_process("id -un > " + str(workdir / "bg.txt"), user="root")
    assert mine.stdout.split("\n")[:3] == ["nobody", nobody.pw_dir, "/"]  # its home is missing: /
    assert as_root.stdout.split("\n")[:3] == ["root", "/root", "/root"]
    assert in_dir.stdout == f"{workdir}\n"
    assert started.pid > 0


async def test_unknown_user_and_missing_cwd_are_refused(nobody_agent: tuple[str, Path]) -> None:
    sock, _ = nobody_agent
    async with open_agent(sock, connect_timeout=10) as client:
        with trio.fail_after(20):
            with pytest.raises(AgentRequestError) as unknown:
                await client.exec("true", user="no-such-user-here")
            with pytest.raises(AgentRequestError) as missing:
                await client.start_process("true", cwd="/no/such/dir")
    assert unknown.value.code == "not_found"
    assert (missing.value.code, missing.value.message) == (
        "invalid_argument", "cwd /no/such/dir: no such directory")


async def test_new_files_belong_to_the_default_user_and_replaced_ones_keep_their_owner(
        nobody_agent: tuple[str, Path]) -> None:
    sock, workdir = nobody_agent
    nobody = pwd.getpwnam("nobody")
    kept = workdir / "kept.txt"
    kept.write_text("root's\n")
    async with open_agent(sock, connect_timeout=10) as client:
        with trio.fail_after(20):
            await client.write_file(str(workdir / "new" / "deep" / "file.txt"), b"hello")
            await client.write_file(str(kept), b"replaced")
            await client.mkdir(str(workdir / "made" / "inner"))
    for path in (workdir / "new", workdir / "new" / "deep", workdir / "new" / "deep" / "file.txt",
                 workdir / "made", workdir / "made" / "inner"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    assert kept.read_text() == "replaced"
    assert (kept.stat().st_uid, kept.stat().st_gid) == (0, 0)
    assert workdir.stat().st_uid == 0  # what existed is left alone


async def test_pong_reports_the_root_filesystem_as_df_does(nobody_agent: tuple[str, Path]) -> None:
    sock, _ = nobody_agent
    async with open_agent(sock, connect_timeout=10) as client:
        pong = await client.ping()
    st = os.statvfs("/")
    assert pong.disk_total_bytes == st.f_blocks * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    assert abs(pong.disk_used_bytes - used) < 256 * 1024 * 1024  # the host's disk moves meanwhile
