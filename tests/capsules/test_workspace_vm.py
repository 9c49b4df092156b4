"""The default capsule is a place to work: on a real QEMU VM, over real HTTP, against ``dovecote up``.

Commands run as ``wrenn-user`` (passwordless sudo, ``HOME=/home/wrenn-user``,
started there), the image carries git, curl, procps, python3 with pip and
venv, and apt reaches Debian through the capsule's egress; a foreground exec
past its ``timeout_sec`` is an error, a missing ``cwd`` a 4xx; the capsule
reports the real size and usage of its root filesystem. One suite and one
capsule for the module (see ``test_capsules_vm.py`` for the image cache).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers.capsules import Api, running_capsule

pytestmark = pytest.mark.slow

HOME = "/home/wrenn-user"


class Capsule:
    def __init__(self, api: Api, capsule_id: str) -> None:
        self.api, self.id = api, capsule_id

    def exec(self, cmd: str, **kw: Any) -> httpx.Response:
        timeout = kw.get("timeout_sec", 30) + 60
        return self.api.post(f"/v1/capsules/{self.id}/exec", {"cmd": cmd, **kw}, timeout=timeout)

    def run(self, cmd: str, **kw: Any) -> dict[str, Any]:
        """Run ``cmd`` in the foreground; it must answer 200 and exit 0."""
        response = self.exec(cmd, **kw)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert body["exit_code"] == 0, body
        return body

    def out(self, cmd: str, **kw: Any) -> str:
        return str(self.run(cmd, **kw)["stdout"]).strip()

    def record(self) -> dict[str, Any]:
        response = self.api.get(f"/v1/capsules/{self.id}")
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture(scope="module")
def capsule() -> Iterator[Capsule]:
    with running_capsule("dcwk-") as (_, api, capsule_id):
        yield Capsule(api, capsule_id)


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    return response.status_code, body["error"]["code"]


def test_commands_run_as_wrenn_user_in_its_home_with_passwordless_sudo(capsule: Capsule) -> None:
    assert capsule.out("whoami") == "wrenn-user"
    assert capsule.out("id -u") == "1000"
    assert capsule.out("pwd") == HOME
    assert capsule.out('echo "$HOME $USER"') == f"{HOME} wrenn-user"
    sudo = capsule.run("sudo -n true")
    assert sudo["stderr"] == ""  # no "unable to resolve host": the hostname is in /etc/hosts
    assert capsule.out("sudo -n whoami") == "root"
    # Another user, named; a process started in the background is the default user's too.
    assert capsule.out("whoami", user="root") == "root"
    assert capsule.out("pwd", user="root") == "/root"
    started = capsule.exec(f"whoami > {HOME}/bg-user.txt; pwd >> {HOME}/bg-user.txt", background=True)
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 30
    while capsule.exec(f"test -s {HOME}/bg-user.txt").json()["exit_code"] != 0:
        assert time.monotonic() < deadline, "the background process never wrote its file"
        time.sleep(0.5)
    assert capsule.out(f"cat {HOME}/bg-user.txt").split("\n") == ["wrenn-user", HOME]


def test_cwd_is_honoured_and_a_missing_one_is_a_4xx(capsule: Capsule) -> None:
    assert capsule.out("pwd", cwd="/tmp") == "/tmp"
    for background in (False, True):
        missing = capsule.exec("pwd", cwd="/no/such/dir", background=background)
        status, code = error_of(missing)
        assert (status, code) == (400, "invalid_argument"), missing.text
        assert "/no/such/dir" in missing.json()["error"]["message"]
    not_a_dir = capsule.exec("pwd", cwd="/etc/hostname")
    assert error_of(not_a_dir) == (400, "not_a_directory"), not_a_dir.text


def test_a_foreground_exec_past_its_timeout_is_an_error(capsule: Capsule) -> None:
    began = time.monotonic()
    response = capsule.exec("echo started; sleep 60", timeout_sec=2)
    assert time.monotonic() - began < 30
    assert error_of(response) == (408, "timeout"), response.text
    assert "timeout_sec of 2" in response.json()["error"]["message"]
    # The command was killed, not left running.
    assert "sleep 60" not in capsule.out("ps -eo args")


def test_the_image_carries_git_curl_procps_and_python_with_venv(capsule: Capsule) -> None:
    assert capsule.out("git --version").startswith("git version 2.")
    capsule.run("git init -q repo && cd repo && echo hi > a.txt && git add a.txt && "
                "git -c user.name=W -c user.email=w@example.com commit -qm first")
    assert capsule.out("git -C repo log --format=%s") == "first"
    assert capsule.out("curl --version").startswith("curl 7.")
    assert capsule.out("test -s /etc/ssl/certs/ca-certificates.crt && echo ok") == "ok"
    processes = capsule.out("ps aux")
    assert "dovecote/vmmgr/guest/agent" in processes and "USER" in processes
    assert "Mem:" in capsule.out("free -m")
    capsule.run("python3 -m venv venv", timeout_sec=180)
    assert capsule.out("venv/bin/python -c 'import sys; print(sys.prefix)'") == f"{HOME}/venv"
    assert capsule.out("venv/bin/pip --version").startswith("pip ")


def test_apt_get_and_pip_reach_their_archives(capsule: Capsule) -> None:
    update = capsule.exec("sudo apt-get update", timeout_sec=600)
    assert update.status_code == 200, update.text
    assert update.json()["exit_code"] == 0, update.json()
    install = capsule.exec("sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q tree",
                           timeout_sec=600)
    assert install.status_code == 200 and install.json()["exit_code"] == 0, install.text
    assert capsule.out("tree --version").startswith("tree v")
    pip = capsule.exec("venv/bin/pip install -q --no-cache-dir six && venv/bin/python -c "
                       "'import six; print(six.__version__)'", timeout_sec=600)
    assert pip.status_code == 200 and pip.json()["exit_code"] == 0, pip.text


def test_files_the_api_creates_belong_to_wrenn_user(capsule: Capsule) -> None:
    base = f"/v1/capsules/{capsule.id}/files"
    written = capsule.api.post(f"{base}/write", data={"path": f"{HOME}/notes/todo.txt"},
                               files={"file": ("todo.txt", b"one\n")})
    assert written.status_code == 204, written.text
    owners = capsule.out("stat -c %U:%G notes notes/todo.txt").split("\n")
    assert owners == ["wrenn-user:wrenn-user"] * 2
    capsule.run("echo two >> notes/todo.txt")
    assert capsule.out("cat notes/todo.txt") == "one\ntwo"


def test_disk_size_and_usage_are_the_root_filesystems(capsule: Capsule) -> None:
    size, used = (int(v) for v in capsule.out("df -B1M --output=size,used / | tail -1").split())
    record = capsule.record()
    assert record["disk_size_mb"] == size, (record, size)
    assert size > 4500  # the 2 GB image grew to the default 5120 MB disk
    assert record["disk_used_mb"] is not None and abs(record["disk_used_mb"] - used) < 200, (record, used)
    capsule.run("head -c 300M /dev/zero > big.bin && sync", timeout_sec=300)
    deadline = time.monotonic() + 60  # vmmgr refreshes the usage every 15 s
    while capsule.record()["disk_used_mb"] < used + 250:
        assert time.monotonic() < deadline, capsule.record()
        time.sleep(2)
    capsule.run("rm big.bin")
