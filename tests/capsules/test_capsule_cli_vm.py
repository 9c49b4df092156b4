"""The first run as the README says it, and ``dovecote capsule ...``, on real VMs.

One ``dovecote up`` with the libvirt driver for the module. The README test
reads the commands of the README's "First steps" (so it breaks when the README
drifts) and runs them in bash as a user would paste them, against this suite:
``./dovecote up`` is the suite already running, ``./dovecote`` is the venv's
``dovecote`` (what the script executes after its install steps; see
``tests/suite/test_first_run.py``) and ``127.0.0.1:8080`` is this suite's
address. The other tests drive one capsule through the CLI only: exec, a PTY
shell over a real terminal that survives the gateway being SIGKILLed, cp both
ways, pause/resume with a process that keeps counting, destroy.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.capsules import BOOT_TIMEOUT_S, IMAGE_DIR, libvirt_ready
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOVECOTE = Path(sys.executable).parent / "dovecote"
READY_TIMEOUT_S = 2400  # a first build of the image and the template takes minutes under TCG


def readme_first_steps() -> list[str]:
    """The ``sh`` blocks of the README's "First steps" section, in order."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## First steps\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "README.md has no '## First steps' section"
    return re.findall(r"^```sh\n(.*?)^```", match.group(1), re.S | re.M)


class World:
    def __init__(self, suite: Suite, home: Path) -> None:
        self.suite, self.home = suite, home
        self.capsule_id = ""

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in self.suite.env.items() if k != "XDG_CONFIG_HOME"}
        env.update({"DOVECOTE_DATA_DIR": str(self.suite.data_dir), "HOME": str(self.home),
                    "DOVECOTE_URL": self.suite.url, **extra})
        return env

    def cli(self, *args: str, input: str | bytes | None = None, timeout: float = 300,
            text: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(DOVECOTE), *args], env=self.env(), input=input,
                              capture_output=True, text=text, timeout=timeout)

    def ok(self, *args: str, **kw: object) -> str:
        result = self.cli(*args, **kw)  # type: ignore[arg-type]
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return str(result.stdout)

    def child_pid(self, name: str) -> int:
        """The pid of the suite's ``name`` process (a child of ``dovecote up``)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.suite.proc.pid and cmdline[-2:] == [name.encode(), b""]:
                return int(entry.name)
        raise AssertionError(f"no {name} process under dovecote up")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = libvirt_ready()
    if reason:
        pytest.fail(f"VM tests need libvirt (infra/system-deps.sh installs it): {reason}")
    top = Path(tempfile.mkdtemp(prefix="dccli-", dir="/tmp"))
    top.chmod(0o755)  # QEMU's user reads the capsule files under it
    Path(IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    suite = Suite(data_dir=top / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
        "DOVECOTE_VM_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S)})
    try:
        suite.wait_ready()
        (top / "data").chmod(0o755)
        home = top / "home"
        home.mkdir()
        yield World(suite, home)
    except BaseException:
        print("".join(suite.output[-200:]))
        raise
    finally:
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


def _wait_line(suite: Suite, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(suite.output):
            if line.startswith(prefix):
                return line
        time.sleep(1)
    raise AssertionError(f"dovecote up never said {prefix!r}:\n" + "".join(suite.output[-80:]))


def test_up_shows_the_builds_and_says_when_capsules_are_ready(world: World) -> None:
    ready = _wait_line(world.suite, "Capsules are", READY_TIMEOUT_S)
    assert ready.startswith("Capsules are ready."), ready
    assert "dovecote key create" in ready
    up = next(i for i, line in enumerate(world.suite.output) if line.startswith("Dovecote is up"))
    assert world.suite.output.index(ready) > up  # said after the suite is up, as its own line
    # It is true when said: the image and the built-in template are there for creates.
    # (Each step in between is printed as it happens: tests/services/test_up_progress.py.)
    details = httpx.get(world.suite.url + "/healthz", timeout=10).json()["services"]["vmmgr"]["details"]
    assert details["image"] == "ready" and details.get("template", "ready") == "ready", details


def test_the_readme_first_steps_run_as_pasted_and_end_with_hello_from_a_capsule(world: World) -> None:
    blocks = readme_first_steps()
    assert len(blocks) >= 2, blocks
    assert blocks[0].strip() == "./dovecote up"  # the suite this module runs
    script = blocks[1]
    assert "-d '{" in script and "127.0.0.1:8080" in script  # curl as people write it
    script = script.replace("./dovecote", str(DOVECOTE))
    script = script.replace("127.0.0.1:8080", f"127.0.0.1:{world.suite.port}")
    script += '\necho; echo "README-ID=$ID"\n'  # curl's answer ends without a newline
    # A user of their own (HOME), in the checkout, with the suite's data dir as `./dovecote up` has it.
    env = world.env()
    del env["DOVECOTE_URL"]  # the README's user has the default gateway...
    env["DOVECOTE_CONFIG"] = str(world.home / "readme.toml")  # ...which the saved config says here
    (world.home / "readme.toml").write_text(f'url = "{world.suite.url}"\n')
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1200)
    capsule_id = re.search(r"README-ID=(\S*)", result.stdout)
    try:
        assert result.returncode == 0, (result.stdout, result.stderr)
        lines = result.stdout.strip().splitlines()
        assert lines[-1].startswith("README-ID=cap-")
        assert "hello" in lines  # dovecote capsule exec
        answer = json.loads(lines[-2])  # the curl, last of the README's commands
        assert (answer["stdout"], answer["exit_code"]) == ("hello\n", 0), answer
    finally:
        if capsule_id and capsule_id.group(1):
            world.cli("capsule", "destroy", capsule_id.group(1), "--no-wait")


def test_capsule_create_list_exec(world: World) -> None:
    key = world.ok("key", "create", "--email", "cli-user@example.com").strip()
    assert key.startswith("wrn_")
    world.capsule_id = world.ok("capsule", "create").strip()
    assert re.fullmatch(r"cap-[0-9a-f]+", world.capsule_id), world.capsule_id
    listing = world.ok("capsule", "list")
    row = [line.split() for line in listing.splitlines() if line.startswith(world.capsule_id)]
    assert row and row[0][1:3] == ["running", "minimal"], listing
    assert json.loads(world.ok("capsule", "show", world.capsule_id))["status"] == "running"
    # Output streams as it comes, each on its own stream; the exit code is the command's.
    run = world.cli("capsule", "exec", world.capsule_id, "--", "sh", "-c",
                    "echo out; echo err >&2; exit 3")
    assert (run.returncode, run.stdout, run.stderr) == (3, "out\n", "err\n")
    # One argument is a shell command line; environment and working directory pass through.
    line = world.ok("capsule", "exec", world.capsule_id, "--env", "WHO=dove", "--cwd", "/tmp",
                    "--", 'echo "$WHO in $(pwd)" | tr a-z A-Z')
    assert line == "DOVE IN /TMP\n"


def _read_until(fd: int, pattern: bytes, timeout: float, seen: bytearray) -> None:
    deadline = time.monotonic() + timeout
    while pattern not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"never saw {pattern!r} in:\n{bytes(seen[-3000:])!r}")
        ready, _, _ = select.select([fd], [], [], min(left, 1))
        if ready:
            try:
                seen.extend(os.read(fd, 65536))
            except OSError:  # the other end closed
                tail = bytes(seen[-3000:])
                raise AssertionError(f"the terminal closed before {pattern!r}:\n{tail!r}") from None


def test_capsule_shell_is_a_real_terminal_that_survives_a_dropped_connection(world: World) -> None:
    assert world.capsule_id
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, cols
    proc = subprocess.Popen([str(DOVECOTE), "capsule", "shell", world.capsule_id],
                            stdin=slave, stdout=slave, stderr=slave, env=world.env(TERM="xterm"),
                            start_new_session=True)
    os.close(slave)
    seen = bytearray()
    try:
        # A PTY in the capsule: a tty there, of our terminal's size. (Typed before the
        # command has set up the terminal: nothing typed is lost.)
        os.write(master, b"export X=41; tty; stty size; echo ready-$((X-1))\r")
        _read_until(master, b"ready-40", 120, seen)
        assert b"/dev/pts/" in seen and b"\r\n40 120\r\n" in seen
        # Raw mode here: Ctrl-C goes to the capsule's foreground job, not to us.
        os.write(master, b"sleep 30; echo slept\r")
        time.sleep(1)
        os.write(master, b"\x03")
        os.write(master, b"echo interrupted-$?\r")
        _read_until(master, b"interrupted-130", 60, seen)
        assert proc.poll() is None
        # The connection drops: the gateway dies (dovecote up restarts it).
        os.kill(world.child_pid("gateway"), signal.SIGKILL)
        _read_until(master, b"connection lost", 60, seen)
        _read_until(master, b"reconnected", 120, seen)
        # The same shell, its variable still set; what it printed is not replayed twice.
        os.write(master, b"echo again-$((X+1))\r")
        _read_until(master, b"again-42", 60, seen)
        assert seen.count(b"ready-40") == 1  # resumed from the last byte shown: no replay
        os.write(master, b"exit 7\r")
        assert proc.wait(timeout=60) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_capsule_cp_copies_files_both_ways(world: World, tmp_path: Path) -> None:
    assert world.capsule_id
    blob = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "blob.bin").write_bytes(blob)
    world.ok("capsule", "cp", str(tmp_path / "blob.bin"), f"{world.capsule_id}:/tmp/")
    remote_sum = world.ok("capsule", "exec", world.capsule_id, "--", "sha256sum", "/tmp/blob.bin")
    assert remote_sum.split()[0] == hashlib.sha256(blob).hexdigest()
    out = tmp_path / "back"
    out.mkdir()
    world.ok("capsule", "cp", f"{world.capsule_id}:/tmp/blob.bin", str(out))
    assert (out / "blob.bin").read_bytes() == blob
    # '-' is stdin and stdout.
    world.ok("capsule", "cp", "-", f"{world.capsule_id}:/tmp/note.txt", input="a note\n")
    assert world.ok("capsule", "cp", f"{world.capsule_id}:/tmp/note.txt", "-") == "a note\n"
    missing = world.cli("capsule", "cp", f"{world.capsule_id}:/tmp/nothing-here", str(out))
    assert missing.returncode == 1 and "dovecote capsule cp: " in missing.stderr
    assert not (out / "nothing-here").exists()


def test_capsule_pause_resume_keeps_processes_then_destroy(world: World) -> None:
    assert world.capsule_id
    world.ok("capsule", "exec", world.capsule_id, "--",
             "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done' "
             ">/dev/null 2>&1 &")
    time.sleep(2)
    before = int(world.ok("capsule", "exec", world.capsule_id, "--", "cat", "/tmp/counter"))
    assert world.ok("capsule", "pause", world.capsule_id).split() == [world.capsule_id, "paused"]
    assert json.loads(world.ok("capsule", "show", world.capsule_id))["status"] == "paused"
    assert world.ok("capsule", "resume", world.capsule_id).split() == [world.capsule_id, "running"]
    first = int(world.ok("capsule", "exec", world.capsule_id, "--", "cat", "/tmp/counter"))
    time.sleep(2)
    second = int(world.ok("capsule", "exec", world.capsule_id, "--", "cat", "/tmp/counter"))
    assert before <= first < second  # the same process, counting on
    assert world.ok("capsule", "destroy", world.capsule_id).strip() == f"{world.capsule_id} destroyed"
    listing = world.ok("capsule", "list")
    assert not [line for line in listing.splitlines()
                if line.startswith(world.capsule_id) and "running" in line]
    gone = world.cli("capsule", "exec", world.capsule_id, "--", "true")
    assert gone.returncode == 1 and "dovecote capsule exec: " in gone.stderr
