"""Fixtures: the REAL guest agent as a subprocess on the host (``--listen-unix``)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dovecote.vmmgr import guest


@dataclass
class RunningAgent:
    socket: str
    process: subprocess.Popen[bytes]
    etc: Path  # where the agent writes machine-id and hostname (tests never touch /etc)
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def agent() -> Iterator[RunningAgent]:
    # A short path under /tmp: unix socket paths are limited to 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="dca-", dir="/tmp"))
    etc = workdir / "etc"
    etc.mkdir()
    sock = str(workdir / "a.sock")
    log = workdir / "agent.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                guest.AGENT_MODULE,
                "--listen-unix",
                sock,
                "--no-system-changes",
                "--machine-id-path",
                str(etc / "machine-id"),
                "--hostname-path",
                str(etc / "hostname"),
                "--log-level",
                "DEBUG",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield RunningAgent(socket=sock, process=process, etc=etc, log=log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the agent kills what it started
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
