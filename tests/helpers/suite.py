"""Start ``dovecote up`` as a user would, in a temp data dir, and stop it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Suite:
    """A running ``dovecote up`` process tree."""

    def __init__(self, data_dir: Path | None = None, extra_env: dict[str, str] | None = None,
                 grace: float = 5.0, extra_args: list[str] | None = None) -> None:
        # Not under pytest's basetemp: a concurrent pytest run chmods it 0700,
        # which locks the embedded PostgreSQL's system user out when root.
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="dovecote-suite-")) / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output: list[str] = []
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DOVECOTE_", "DATABASE_URL", "SMTP_URL"))}
        # No VMs unless a test asks for them (DOVECOTE_VM_DRIVER=libvirt): the
        # image build and boots are the capsule tests' business.
        env["DOVECOTE_VM_DRIVER"] = "none"
        env.update(extra_env or {})
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dovecote.services.cli", "up", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--grace", str(grace), *(extra_args or [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if line.startswith("Dovecote is up"):
                self._ready.set()

    def wait_ready(self, timeout: float = 180) -> None:
        if not self._ready.wait(timeout):
            raise AssertionError("dovecote up did not become healthy:\n" + "".join(self.output[-60:]))

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run another ``dovecote`` command against this suite."""
        return subprocess.run([sys.executable, "-m", "dovecote.services.cli", *args],
                              env={**self.env, "DOVECOTE_DATA_DIR": str(self.data_dir)},
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.env.get("DOVECOTE_VM_DRIVER") == "libvirt":
            destroy_vms_under(self.data_dir)
        return self.proc.returncode


def destroy_vms_under(directory: Path) -> list[str]:
    """Destroy the libvirt domains whose files live under ``directory`` (what a test left).

    Capsules outlive ``dovecote up`` by design (libvirt owns them), so a suite in
    a temporary directory must not leave VMs behind for the next tests.
    """
    try:
        import libvirt
    except ImportError:
        return []
    root = str(Path(directory).resolve())
    destroyed = []
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError:
        return []
    try:
        for dom in conn.listAllDomains(0):
            try:
                if dom.name().startswith("dovecote-") and root + "/" in dom.XMLDesc(0):
                    dom.destroy()
                    destroyed.append(dom.name())
            except libvirt.libvirtError:
                continue
    finally:
        conn.close()
    return destroyed
