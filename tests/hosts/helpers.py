"""Clients of the hosts API: admins, team owners and host agents."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from tests.accounts.helpers import Browser
from tests.helpers import users
from tests.helpers.suite import Suite, destroy_vms_under
from tests.helpers.users import create_admin as create_admin
from tests.helpers.users import eventually as eventually

PASSWORD = "admin-password-123"
SPECS = {"arch": "x86_64", "cpu_cores": 8, "memory_mb": 16384, "disk_gb": 200,
         "address": "10.0.0.5:9000"}


def regular_user(suite: Suite, name: str) -> tuple[Browser, dict[str, Any]]:
    """A new non-admin account (owner of its default team), logged in."""
    browser, session, _ = users.regular_user(suite, name)
    return browser, session


def agent(suite: Suite) -> httpx.Client:
    """A host agent's HTTP client: no cookies, no session."""
    return httpx.Client(base_url=suite.url, timeout=30)


def create_host(browser: Browser, **body: Any) -> dict[str, Any]:
    response = browser.post("/v1/hosts", {"type": "regular", **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def register(suite: Suite, token: str, **specs: Any) -> httpx.Response:
    with agent(suite) as http:
        return http.post("/v1/hosts/register", json={"token": token, **SPECS, **specs})


def heartbeat(suite: Suite, host_id: str, jwt: str) -> httpx.Response:
    with agent(suite) as http:
        return http.post(f"/v1/hosts/{host_id}/heartbeat", headers={"X-Host-Token": jwt})


def refresh(suite: Suite, refresh_token: str) -> httpx.Response:
    with agent(suite) as http:
        return http.post("/v1/hosts/auth/refresh", json={"refresh_token": refresh_token})


def _child_env(suite: Suite, service: str) -> dict[str, str]:
    """The environment ``dovecote up`` gave one of its children (bus and database)."""
    out = subprocess.run(["pgrep", "-f", f"dovecote.services.cli {service}$"], capture_output=True,
                         text=True, check=False).stdout.split()
    for pid in out:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        if env.get("DOVECOTE_DATA_DIR") == str(suite.data_dir):
            return env
    raise AssertionError(f"no {service} child of the suite found")


class HostProcess:
    """``dovecote vmmgr`` as a second machine would run it, in its own data directory."""

    netns: str | None = None
    """The network namespace the process runs in (see :class:`Netns`), if any."""

    def __init__(self, suite: Suite, **env: str) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="dchost-"))
        self.data_dir.chmod(0o755)  # libvirt's QEMU user opens the capsule files under it
        inherited = {k: v for k, v in _child_env(suite, "vmmgr").items()
                     if k not in ("DOVECOTE_HOST_ID", "DOVECOTE_PARENT_PID", "DOVECOTE_VM_RUN_DIR")}
        self.env = {**inherited, "DOVECOTE_DATA_DIR": str(self.data_dir), "DOVECOTE_VM_DRIVER": "none",
                    "DOVECOTE_HOST_HEARTBEAT_S": "1", **env}
        self.proc: subprocess.Popen[str] | None = None
        self.log = self.data_dir / "vmmgr.log"

    def start(self, *args: str) -> None:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "dovecote.services.cli", "vmmgr", *args],
                                     env=self.env, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                     text=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a test may have left it stopped
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        destroy_vms_under(self.data_dir)  # libvirt keeps a host's VMs: never leave one behind
        shutil.rmtree(self.data_dir, ignore_errors=True)


class Netns:
    """A network namespace linked to the host by a veth pair: a machine of its own
    on one machine. The host side is ``10.203.<n>.1``, the namespace ``10.203.<n>.2``;
    :meth:`cut` and :meth:`restore` take its link down and up (a partition)."""

    def __init__(self, n: int) -> None:
        self.name = f"dch{n}-{os.getpid() % 10000}"
        self.host_ip, self.ns_ip = f"10.203.{n}.1", f"10.203.{n}.2"
        self.outer, self.inner = f"dco{n}x{os.getpid() % 10000}", f"dci{n}x{os.getpid() % 10000}"
        run = self._run
        # A run killed before its clean-up leaves its links: one holding this subnet
        # would take the replies of ours.
        stale = subprocess.run(["ip", "-o", "addr", "show", "to", f"{self.host_ip}/24"],
                               capture_output=True, text=True, check=False).stdout.split()
        if len(stale) > 1:
            subprocess.run(["ip", "link", "del", stale[1].split("@")[0]], capture_output=True, check=False)
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        run("ip", "link", "set", self.inner, "netns", self.name)
        run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.outer)
        run("ip", "link", "set", self.outer, "up")
        self.exec("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.inner)
        self.exec("ip", "link", "set", self.inner, "up")
        self.exec("ip", "link", "set", "lo", "up")

    @staticmethod
    def _run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    def exec(self, *argv: str) -> None:
        self._run("ip", "netns", "exec", self.name, *argv)

    def cut(self) -> None:
        self.exec("ip", "link", "set", self.inner, "down")

    def restore(self) -> None:
        self.exec("ip", "link", "set", self.inner, "up")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30, check=False)

