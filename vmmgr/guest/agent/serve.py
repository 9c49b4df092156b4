"""Serving: the agent's command line, and the loops that give it host connections.

``--device`` reopens a virtio-serial port forever (with backoff while no host
is connected); ``--listen-unix`` (tests, the xvfb desktop) and
``--listen-vsock`` (Cloud Hypervisor) accept one connection at a time. Each
connection is served as one :class:`~.channel.Session` whose requests go to the
one :class:`~.dispatch.Agent`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from .channel import Session
from .dispatch import Agent

log = logging.getLogger("dovecote-agent")

MAX_REOPEN_BACKOFF_S = 0.2
"""Longest wait between two opens of the port while no host is connected: a VM
restored from a template or resumed from a pause is served within this."""


async def serve_device(agent: Agent, path: str) -> None:
    backoff = 0.05
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            log.warning("cannot open %s: %s", path, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_REOPEN_BACKOFF_S)
            continue
        try:
            received = await Session(agent.handle, fd).run()
        finally:
            os.close(fd)
        # EOF right away means the host end is not connected: back off; after a real
        # session, reopen quickly so a reconnecting host is served at once.
        backoff = 0.05 if received else min(backoff * 2, MAX_REOPEN_BACKOFF_S)
        await asyncio.sleep(backoff)


async def serve_unix(agent: Agent, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    log.info("listening on %s", path)
    await _serve_listener(agent, listener)


async def _serve_listener(agent: Agent, listener: socket.socket) -> None:
    """Accept host connections one at a time and serve each as a session."""
    listener.listen(4)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    with listener:
        while True:
            conn, _ = await loop.sock_accept(listener)
            with conn:
                log.info("host connected")
                await Session(agent.handle, conn.fileno()).run()
                log.info("host disconnected")


async def serve_vsock(agent: Agent, port: int) -> None:
    """Serve one host connection at a time on vsock ``port`` (Cloud Hypervisor)."""
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    log.info("listening on vsock port %d", port)
    await _serve_listener(agent, listener)


async def main_async(config: argparse.Namespace) -> None:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if config.device:
        server = asyncio.ensure_future(serve_device(agent, config.device))
    elif config.listen_vsock is not None:
        server = asyncio.ensure_future(serve_vsock(agent, config.listen_vsock))
    else:
        server = asyncio.ensure_future(serve_unix(agent, config.listen_unix))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([server, stopper], return_when=asyncio.FIRST_COMPLETED)
        if server in done:
            server.result()
    finally:
        server.cancel()
        stopper.cancel()
        if config.kill_on_exit:
            agent.processes.shutdown()
        for task in list(agent.processes.tasks):
            task.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Dovecote guest agent")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="virtio-serial character device")
    where.add_argument("--listen-unix", help="serve one connection at a time on this unix socket (tests)")
    where.add_argument("--listen-vsock", type=int, metavar="PORT",
                       help="serve one connection at a time on this vsock port (Cloud Hypervisor)")
    parser.add_argument("--machine-id-path", default="/etc/machine-id")
    parser.add_argument("--hostname-path", default="/etc/hostname")
    parser.add_argument("--hosts-path", default="/etc/hosts",
                        help="its 127.0.1.1 line follows the hostname (not with --no-system-changes)")
    parser.add_argument(
        "--default-user",
        default="",
        help="run processes and PTYs that name no user as this user, in its home; files and "
        "directories the agent creates belong to it",
    )
    parser.add_argument(
        "--no-system-changes",
        action="store_true",
        help="never set the hostname or the clock (tests on a host)",
    )
    parser.add_argument(
        "--kill-on-exit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SIGKILL the processes and PTYs the agent started when it stops",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(config))
