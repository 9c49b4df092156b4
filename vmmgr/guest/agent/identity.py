"""Identity: what the host pushes into a fresh guest, and what the guest reports.

:func:`set_identity` applies a ``SetIdentity`` step by step (hostname and its
``/etc/hosts`` line, machine id, environment for later processes, RNG seed,
clock), best effort: each step reports ok, skipped or its error. The
``boot_id``/``uptime``/``disk_usage`` facts go into the ``Pong``.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import socket
import time
from collections.abc import Callable

from .. import protocol as P


def set_identity(req: P.SetIdentity, config: argparse.Namespace, env_out: dict[str, str]) -> P.IdentitySet:
    """Apply ``req``; the variables it pushes go into ``env_out`` (the environment of later processes)."""
    steps: list[P.StepResult] = []
    system = not config.no_system_changes

    def step(name: str, fn: Callable[[], str | None]) -> None:
        try:
            detail = fn() or ""
            status = "skipped" if detail.startswith("skipped") else "ok"
            steps.append(P.StepResult(step=name, status=status, detail=detail))
        except Exception as exc:  # best effort: report and go on
            steps.append(P.StepResult(step=name, status="error", detail=f"{type(exc).__name__}: {exc}"))

    if req.hostname is not None:
        hostname = req.hostname

        def set_hostname() -> str | None:
            if not hostname or len(hostname) > 64 or not all(c.isalnum() or c in "-." for c in hostname):
                raise ValueError(f"bad hostname {hostname!r}")
            write_text(config.hostname_path, hostname + "\n")
            if not system:
                return "skipped sethostname (--no-system-changes); file written"
            socket.sethostname(hostname)
            set_hosts_name(config.hosts_path, hostname)
            return None

        step("hostname", set_hostname)
    if req.machine_id is not None:
        machine_id = req.machine_id

        def set_machine_id() -> str | None:
            if len(machine_id) != 32 or any(c not in "0123456789abcdef" for c in machine_id):
                raise ValueError("machine_id must be 32 lowercase hex digits")
            if not os.access(posixpath.dirname(config.machine_id_path), os.W_OK):
                return f"skipped: {config.machine_id_path} is not writable"
            write_text(config.machine_id_path, machine_id + "\n")
            return None

        step("machine_id", set_machine_id)
    if req.env is not None:
        env = req.env

        def set_env() -> str:
            for key in env:
                if not key or "=" in key or "\0" in key:
                    raise ValueError(f"bad variable name {key!r}")
            env_out.update(env)
            return f"{len(env)} variables"

        step("env", set_env)
    if req.rng_seed is not None:
        seed = req.rng_seed

        def seed_rng() -> str:
            with open("/dev/urandom", "wb") as f:
                f.write(seed)
            return f"{len(seed)} bytes mixed in"

        step("rng_seed", seed_rng)
    if req.clock_unix_ns is not None:
        ns = req.clock_unix_ns

        def set_clock() -> str | None:
            if not system:
                return "skipped (--no-system-changes)"
            time.clock_settime_ns(time.CLOCK_REALTIME, ns)
            return None

        step("clock", set_clock)
    return P.IdentitySet(id=req.id, steps=steps)


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.dovecote-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def set_hosts_name(path: str, hostname: str) -> None:
    """Point ``127.0.1.1`` at ``hostname`` in the hosts file, so the name resolves
    without DNS (sudo and friends look it up)."""
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if not line.startswith("127.0.1.1")]
    except FileNotFoundError:
        lines = ["127.0.0.1\tlocalhost"]
    lines.insert(1 if lines else 0, f"127.0.1.1\t{hostname}")
    write_text(path, "\n".join(lines) + "\n")


def disk_usage(path: str = "/") -> tuple[int, int]:
    """(size, used) of the filesystem holding ``path``, in bytes, as ``df`` counts them."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0, 0
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


# ------------------------------------------------------------------ channel


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()

