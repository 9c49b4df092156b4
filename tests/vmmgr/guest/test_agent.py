"""The real guest agent (a subprocess with ``--listen-unix``) driven through the Trio client."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from dovecote.vmmgr.guest import AgentConnectError, AgentConnectionLost, open_agent
from dovecote.vmmgr.guest import protocol as P
from dovecote.vmmgr.guest.client import Exited, Output, PtySession
from dovecote.vmmgr.guest.errors import (
    AgentRequestError,
    AlreadyExists,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    NotFound,
    TooLarge,
)

from .conftest import RunningAgent


async def read_until(stream: PtySession, needle: bytes, seconds: float = 5) -> bytes:
    """PTY output until ``needle`` shows up (fails after ``seconds``)."""
    seen = b""
    with trio.fail_after(seconds):
        async for event in stream:
            assert isinstance(event, Output), event
            seen += event.data
            if needle in seen:
                return seen
    raise AssertionError(f"PTY ended before {needle!r}; saw {seen!r}")


async def test_ping_reports_version_boot_id_and_uptime(agent: RunningAgent) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        pong = await client.ping()
    assert pong.protocol == P.PROTOCOL_VERSION
    assert pong.agent_pid == agent.process.pid
    assert pong.boot_id == (await trio.Path("/proc/sys/kernel/random/boot_id").read_text()).strip()
    assert pong.uptime > 0 and pong.agent_uptime >= 0


async def test_open_agent_gives_up_after_connect_timeout() -> None:
    with trio.fail_after(5), pytest.raises(AgentConnectError):
        async with open_agent("/tmp/dca-nowhere/none.sock", connect_timeout=0.3):
            pass


async def test_exec_echo_hello(agent: RunningAgent) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        shell = await client.exec("echo hello")
        argv = await client.exec(["printf", "%s|%s", "a b", "c"])
        failing = await client.exec("echo oops >&2; exit 3")
    assert (shell.stdout, shell.stderr, shell.exit_code, shell.encoding) == ("hello\n", "", 0, "utf-8")
    assert argv.stdout == "a b|c"
    assert (failing.stderr, failing.exit_code) == ("oops\n", 3)


async def test_exec_non_utf8_output_comes_back_base64(agent: RunningAgent) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        result = await client.exec(r"printf '\377\376ok'; printf 'err' >&2")
    assert result.encoding == "base64"
    assert base64.b64decode(result.stdout) == b"\xff\xfeok"
    assert base64.b64decode(result.stderr) == b"err"


async def test_exec_timeout_kills_the_process_group_and_reports_it(agent: RunningAgent) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        with trio.fail_after(10):
            result = await client.exec("echo before; sleep 30 & sleep 30", timeout=0.5)
    assert result.timed_out
    assert result.exit_code == 128 + signal.SIGKILL
    assert result.stdout == "before\n"
    assert result.duration_ms < 5000


async def test_exec_env_cwd_stdin_and_missing_command(agent: RunningAgent, tmp_path: Path) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        result = await client.exec(
            "echo $GREETING; pwd; cat", env={"GREETING": "hi"}, cwd=str(tmp_path), stdin=b"from stdin"
        )
        assert result.stdout == f"hi\n{tmp_path}\nfrom stdin"
        with pytest.raises(NotFound):
            await client.exec(["/nonexistent/binary"])
        with pytest.raises(AgentRequestError) as missing:
            await client.exec("true", cwd="/nonexistent/dir")
        assert (missing.value.code, missing.value.message) == (
            "invalid_argument", "cwd /nonexistent/dir: no such directory")
        with pytest.raises(NotADirectory):
            await client.exec("true", cwd="/etc/hostname")


async def test_concurrent_requests_share_one_connection(agent: RunningAgent) -> None:
    results: dict[int, str] = {}
    async with open_agent(agent.socket, connect_timeout=10) as client:

        async def run(i: int) -> None:
            results[i] = (await client.exec(f"sleep 0.5; echo {i}")).stdout

        with trio.fail_after(3):  # 8 x 0.5 s in parallel, not in sequence
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(run, i)
    assert results == {i: f"{i}\n" for i in range(8)}


async def test_background_process_is_listed_streamed_and_killed_by_tag(agent: RunningAgent) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        started = await client.start_process("echo ready; echo warn >&2; exec sleep 300", tag="sleeper")
        assert started.tag == "sleeper" and started.pid > 0
        with pytest.raises(AlreadyExists):
            await client.start_process("sleep 1", tag="sleeper")
        listed = {p.tag: p for p in await client.list_processes()}
        assert listed["sleeper"].pid == started.pid and listed["sleeper"].running
        everything = await client.list_processes(include_system=True)
        assert any(p.kind == "system" and p.pid == agent.process.pid for p in everything)

        events: list[Output | Exited] = []
        with trio.fail_after(10):
            async with client.stream_process("sleeper") as stream:
                assert stream.pid == started.pid
                async for event in stream:
                    events.append(event)
                    seen = {e.channel: e.data for e in events if isinstance(e, Output)}
                    if isinstance(event, Output) and seen == {"stdout": b"ready\n", "stderr": b"warn\n"}:
                        killed = await client.kill("sleeper", "SIGTERM")
                        assert killed.delivered and killed.pid == started.pid
        assert events[-1] == Exited(128 + signal.SIGTERM)
        (entry,) = [p for p in await client.list_processes() if p.tag == "sleeper"]
        assert not entry.running and entry.exit_code == 128 + signal.SIGTERM
        assert not (await client.kill(started.pid)).delivered
        with pytest.raises(NotFound):
            await client.kill("no-such-tag")
        with pytest.raises(NotFound):
            async with client.stream_process("no-such-tag"):
                pass


async def test_background_process_survives_client_disconnect(agent: RunningAgent) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        started = await client.start_process(
            ["sh", "-c", "echo one; sleep 0.5; echo two; exec sleep 300"], tag="keeper"
        )
    # Disconnected; "two" is printed while nobody listens.
    await trio.sleep(1)
    async with open_agent(agent.socket, connect_timeout=10) as client:
        (entry,) = [p for p in await client.list_processes() if p.tag == "keeper"]
        assert entry.running and entry.pid == started.pid and entry.args == ["-c", entry.args[1]]
        out = b""
        with trio.fail_after(5):
            async with client.stream_process(started.pid) as stream:
                async for event in stream:
                    assert isinstance(event, Output)
                    out += event.data
                    if out == b"one\ntwo\n":
                        break
        await client.kill(started.pid)


async def test_pty_input_resize_and_reconnect_by_tag_replays_missed_output(agent: RunningAgent) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        async with client.open_pty(
            "/bin/bash", args=["--norc", "--noprofile"], env={"PS1": "$ "}, cols=80, rows=24, tag="term"
        ) as pty:
            assert pty.tag == "term" and pty.pid
            await pty.send_input(b"stty size\n")
            assert b"24 80" in await read_until(pty, b"24 80")
            await pty.resize(cols=120, rows=40)
            await pty.send_input(b"stty size\n")
            assert b"40 120" in await read_until(pty, b"40 120")
            await pty.send_input(b"sleep 0.5; echo missed-$((6*7))\n")
            await read_until(pty, b"echo missed")  # the echo of the input, not the result
            resume_at = pty.offset
    # The client is gone while bash prints the result.
    await trio.sleep(1)
    async with open_agent(agent.socket, connect_timeout=10) as client:
        async with client.attach_pty("term", since=resume_at) as pty:
            assert b"missed-42" in await read_until(pty, b"missed-42")
        async with client.attach_pty("term") as pty:  # without since: everything the ring holds
            assert b"24 80" in await read_until(pty, b"missed-42")
            await pty.kill()
            with trio.fail_after(5):
                events = [event async for event in pty]
            assert events[-1] == Exited(128 + signal.SIGKILL)
        with pytest.raises(NotFound):
            async with client.attach_pty("no-such-pty"):
                pass


async def test_50mb_file_streams_both_ways_byte_identical_with_bounded_buffers(
    agent: RunningAgent, tmp_path: Path
) -> None:
    block = 1024 * 1024
    blocks = 50
    sent = hashlib.sha256()

    async def produce() -> AsyncIterator[bytes]:
        for i in range(blocks):
            data = hashlib.sha256(str(i).encode()).digest() * (block // 32)
            sent.update(data)
            yield data

    target = tmp_path / "big" / "blob.bin"
    chunk, window = 256 * 1024, 4
    async with open_agent(agent.socket, connect_timeout=10) as client:
        with trio.fail_after(40):
            entry = await client.write_file(
                str(target), produce(), mode=0o640, chunk_size=chunk, window=window
            )
            assert entry.size == block * blocks and entry.permissions == "-rw-r-----"
            received = hashlib.sha256()
            total = 0
            async with client.read_file(str(target), chunk_size=chunk, window=window) as reader:
                assert reader.size == block * blocks
                async for piece in reader:
                    assert len(piece) <= chunk
                    received.update(piece)
                    total += len(piece)
                    if total == 10 * chunk:
                        await trio.sleep(0.2)  # a slow consumer: the agent must wait, not pile up
                stats = reader.statistics()
    assert total == block * blocks
    assert received.digest() == sent.digest()
    assert hashlib.sha256(target.read_bytes()).digest() == sent.digest()
    assert 0 < stats["max_buffered_bytes"] <= window * chunk
    assert not [p for p in target.parent.iterdir() if p.name != "blob.bin"]  # no temp file left


async def test_upload_cancelled_mid_frame_leaves_the_connection_usable(
    agent: RunningAgent, tmp_path: Path
) -> None:
    """Cancelling write_file while a chunk frame is half written must not break the framing.

    The socket's send_all is slowed so that the cancellation lands exactly
    between the two halves of a chunk frame; the client finishes that frame,
    sends the stream's Cancel (the agent drops the partial file) and keeps
    answering on the same connection.
    """
    target = tmp_path / "upload" / "partial.bin"
    chunk = 256 * 1024
    async with open_agent(agent.socket, connect_timeout=10) as client:
        stream = client._stream
        real_send_all = stream.send_all
        half_written = trio.Event()
        chunks_seen = 0

        async def slow_send_all(data: bytes | bytearray | memoryview) -> None:
            nonlocal chunks_seen
            if len(data) > chunk:  # a chunk frame
                chunks_seen += 1
                if chunks_seen == 3:
                    await real_send_all(bytes(data)[: len(data) // 2])
                    half_written.set()
                    await trio.sleep(0.2)  # the cancellation lands here
                    await real_send_all(bytes(data)[len(data) // 2 :])
                    return
            await real_send_all(data)

        stream.send_all = slow_send_all  # type: ignore[method-assign]

        async def produce() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"x" * chunk

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:

                async def upload() -> None:
                    await client.write_file(str(target), produce(), chunk_size=chunk)

                nursery.start_soon(upload)
                await half_written.wait()
                nursery.cancel_scope.cancel()
            assert client.connected
            result = await client.exec("echo still here", timeout=5)
            assert result.stdout == "still here\n"
            with trio.fail_after(5):  # the agent dropped the partial upload
                while target.parent.exists() and any(target.parent.iterdir()):  # noqa: ASYNC110 - polling the file system
                    await trio.sleep(0.05)
            assert not target.exists()


async def test_small_files_list_with_depth_mkdir_and_remove(agent: RunningAgent, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    async with open_agent(agent.socket, connect_timeout=10) as client:
        await client.write_file(f"{root}/a/b/c.txt", b"deep")
        await client.write_file(f"{root}/top.txt", b"top", mode=0o600)
        os.symlink("top.txt", root / "link")
        assert await client.read_file_bytes(f"{root}/top.txt") == b"top"

        shallow = await client.list_dir(str(root))
        assert [e.name for e in shallow.entries] == ["a", "link", "top.txt"]
        assert [e.name for e in (await client.list_dir(str(root), 0)).entries] == ["a", "link", "top.txt"]
        by_name = {e.name: e for e in shallow.entries}
        assert by_name["a"].type == "directory"
        assert by_name["link"].type == "symlink" and by_name["link"].symlink_target == "top.txt"
        top = by_name["top.txt"]
        assert (top.type, top.size, top.mode, top.permissions, top.owner) == (
            "file",
            3,
            0o600,
            "-rw-------",
            "root",
        )
        assert top.path == f"{root}/top.txt" and top.modified_at > 0
        two = await client.list_dir(str(root), 2)
        assert sorted(e.path.removeprefix(str(root)) for e in two.entries) == [
            "/a",
            "/a/b",
            "/link",
            "/top.txt",
        ]
        three = await client.list_dir(str(root), 3)
        assert f"{root}/a/b/c.txt" in [e.path for e in three.entries]
        assert (await client.list_dir(str(root), 3, max_entries=2)).truncated

        made = await client.mkdir(f"{root}/new/nested")
        assert made.type == "directory" and made.path == f"{root}/new/nested"
        with pytest.raises(AlreadyExists) as exists:
            await client.mkdir(f"{root}/new/nested")
        assert exists.value.code == "already_exists"

        await client.remove(f"{root}/a")
        await client.remove(f"{root}/link")
        assert (root / "top.txt").exists() and not (root / "a").exists()
        with pytest.raises(NotFound):
            await client.remove(f"{root}/a")


async def test_bad_paths_get_clear_errors(agent: RunningAgent, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "huge").write_bytes(b"\0" * (P.MAX_INLINE_FILE + 1))
    async with open_agent(agent.socket, connect_timeout=10) as client:
        with pytest.raises(InvalidPath):
            await client.read_file_bytes("relative/path")
        with pytest.raises(InvalidPath):
            await client.list_dir("/tmp/\0nul")
        with pytest.raises(InvalidPath):
            await client.remove("/")
        with pytest.raises(NotFound):
            await client.read_file_bytes(f"{tmp_path}/missing")
        with pytest.raises(NotFound):
            async with client.read_file(f"{tmp_path}/missing"):
                pass
        with pytest.raises(IsADirectory):
            await client.read_file_bytes(str(tmp_path))
        with pytest.raises(IsADirectory):
            await client.write_file(str(tmp_path), b"x")
        with pytest.raises(NotADirectory):
            await client.list_dir(f"{tmp_path}/file")
        with pytest.raises(NotADirectory):
            await client.write_file(f"{tmp_path}/file/below", b"x")
        with pytest.raises(TooLarge):
            await client.read_file_bytes(f"{tmp_path}/huge")
        # Normalized: ".." is resolved before use.
        assert await client.read_file_bytes(f"{tmp_path}/sub/../file") == b"x"


async def test_set_identity_reports_each_step(agent: RunningAgent) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        steps = await client.set_identity(
            hostname="capsule-1",
            machine_id="0123456789abcdef0123456789abcdef",
            env={"CAPSULE_TOKEN": "s3cret"},
            rng_seed=os.urandom(64),
            clock_unix_ns=1,
        )
        status = {s.step: s.status for s in steps}
        assert status == {
            "hostname": "skipped",
            "machine_id": "ok",
            "env": "ok",
            "rng_seed": "ok",
            "clock": "skipped",
        }
        assert (agent.etc / "machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
        assert (agent.etc / "hostname").read_text() == "capsule-1\n"
        assert (await client.exec("echo $CAPSULE_TOKEN")).stdout == "s3cret\n"
        (bad,) = await client.set_identity(machine_id="not-hex")
        assert bad.status == "error" and "hex" in bad.detail


async def test_losing_the_connection_fails_pending_calls(agent: RunningAgent) -> None:
    async with open_agent(agent.socket, connect_timeout=10) as client:
        failures: list[BaseException] = []

        async def pending_exec() -> None:
            try:
                await client.exec("sleep 3")
            except AgentConnectionLost as exc:
                failures.append(exc)

        async with client.stream_process((await client.start_process("exec sleep 3")).pid) as stream:
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pending_exec)
                    await trio.sleep(0.3)
                    agent.process.kill()
                    with pytest.raises(AgentConnectionLost):
                        async for _ in stream:
                            pass
        assert len(failures) == 1
        with pytest.raises(AgentConnectionLost):
            await client.ping()
