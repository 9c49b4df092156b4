"""``dovecote up``: the whole suite on one machine, supervised.

The supervisor prepares the embedded defaults (a data directory, an embedded
PostgreSQL unless ``DATABASE_URL`` is set, bus sockets under the data
directory, filesystem storage), then starts the broker, every service and the
gateway, each as its own OS process (``python -m dovecote.services.cli NAME``).

It restarts a child that exits unexpectedly, with exponential backoff that
resets once the child has stayed up for a while, and logs every exit. On
Ctrl-C or SIGTERM it stops the children in reverse dependency order (gateway,
vmmgr, the other services, broker), each with SIGTERM then SIGKILL after the
grace period, and finally stops PostgreSQL. vmmgr goes alone and first after
the gateway, with a longer grace: its stop pauses every running capsule
(memory to disk; resumed by the next ``dovecote up``) while the bus, the
database and the notifier are still there, unless ``--keep-running``.
Children run in their own sessions so a terminal's Ctrl-C reaches only the
supervisor, and each child watches its parent's pid
(``DOVECOTE_PARENT_PID``) so none outlives a supervisor that was killed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import trio

from dovecote.bus import BusEndpoints
from dovecote.bus.curve import ENV_PUBLIC, ENV_SECRET
from dovecote.bus.endpoints import ENV_RPC
from dovecote.libs.embedded_pg import start_embedded_postgres
from dovecote.libs.logs import get_logger
from dovecote.services.up_progress import watch_capsules

log = get_logger("dovecote.up")

SERVICES = ["auth", "vmmgr", "recorder", "notifier", "metrics", "agents", "desktops", "browsers", "runs"]


class UpOptions(msgspec.Struct, kw_only=True):
    """What ``dovecote up`` was asked for."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    grace_s: float = 10.0
    ready_timeout_s: float = 120.0
    max_backoff_s: float = 10.0
    keep_running: bool = False
    """Leave capsules running when the suite stops (else vmmgr pauses them)."""
    vm_stop_timeout_s: float = 120.0
    """vmmgr's budget for pausing capsules at stop (``DOVECOTE_VM_STOP_TIMEOUT_S``)."""

    def vmmgr_grace_s(self) -> float:
        """How long to wait for vmmgr's stop before SIGKILL: its own budget, and a margin."""
        return self.grace_s + (0.0 if self.keep_running else self.vm_stop_timeout_s + 10.0)


class Child:
    """One supervised process and its restart bookkeeping."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.process: trio.Process | None = None
        self.restarts = 0
        self.stopping = False
        self.exited = trio.Event()


def suite_environment(options: UpOptions, database_url: str) -> dict[str, str]:
    """The environment every child gets: embedded defaults, unless already set."""
    env = dict(os.environ)
    if not env.get(ENV_RPC):  # else the operator's bus (TCP across machines, with CURVE)
        env.update(BusEndpoints.local(bus_socket_dir(options.data_dir)).to_env())
    env.update({
        "DATABASE_URL": database_url,
        "DOVECOTE_DATA_DIR": str(options.data_dir),
        "DOVECOTE_HTTP_HOST": options.host,
        "DOVECOTE_HTTP_PORT": str(options.port),
        "DOVECOTE_SHUTDOWN_GRACE_S": str(options.grace_s),
        "DOVECOTE_VM_KEEP_RUNNING": "true" if options.keep_running else "false",
        "DOVECOTE_VM_STOP_TIMEOUT_S": str(options.vm_stop_timeout_s),
        "DOVECOTE_PARENT_PID": str(os.getpid()),
    })
    env.setdefault("DOVECOTE_STORAGE_DIR", str(options.data_dir / "storage"))
    # Links in mails and the OAuth callback point at this gateway unless the
    # operator says where the public URL is (a proxy, TLS...).
    env.setdefault("DOVECOTE_PUBLIC_URL", f"http://{options.host}:{options.port}")
    return env


ENV_BROKER_PUBLIC = "DOVECOTE_BUS_BROKER_CURVE_PUBLIC_KEY"
ENV_BROKER_SECRET = "DOVECOTE_BUS_BROKER_CURVE_SECRET_KEY"


def child_environment(name: str, env: dict[str, str]) -> dict[str, str]:
    """One child's environment: on a CURVE bus the broker gets its own keypair
    (``DOVECOTE_BUS_BROKER_CURVE_{PUBLIC,SECRET}_KEY``) where every other process
    has the client keypair of ``DOVECOTE_BUS_CURVE_{PUBLIC,SECRET}_KEY``."""
    if name != "broker" or not env.get(ENV_BROKER_PUBLIC):
        return env
    return {**env, ENV_PUBLIC: env[ENV_BROKER_PUBLIC], ENV_SECRET: env.get(ENV_BROKER_SECRET, "")}


def bus_socket_dir(data_dir: Path) -> Path:
    """Where the bus's ipc sockets go: the data dir, unless its path is too long.

    A unix socket path is limited to about 107 bytes; a deep data directory
    gets a short, stable directory under /tmp instead (named by its hash).
    """
    if len(str(data_dir / "bus" / "events-out.sock")) <= 100:
        return data_dir
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    short = Path(tempfile.gettempdir()) / f"dovecote-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short


async def supervise(child: Child, env: dict[str, str], options: UpOptions) -> None:
    """Keep ``child`` running until it is told to stop."""
    backoff = 0.5
    while not child.stopping:
        started = time.monotonic()
        child.exited = trio.Event()
        child.process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "dovecote.services.cli", child.name],
            env=child_environment(child.name, env), start_new_session=True, stdin=subprocess.DEVNULL)
        log.info("started", extra={"child": child.name, "pid": child.process.pid,
                                    "restarts": child.restarts})
        try:
            code = await child.process.wait()
        finally:
            child.exited.set()
        if child.stopping:
            log.info("stopped", extra={"child": child.name, "returncode": code})
            return
        uptime = time.monotonic() - started
        if uptime > 30:
            backoff = 0.5
        log.error("child exited unexpectedly; restarting",
                  extra={"child": child.name, "returncode": code, "uptime_s": round(uptime, 1),
                         "backoff_s": backoff})
        child.restarts += 1
        await trio.sleep(backoff)
        backoff = min(backoff * 2, options.max_backoff_s)


async def stop_child(child: Child, grace_s: float) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL."""
    child.stopping = True
    proc = child.process
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace_s):
        await child.exited.wait()
        return
    log.warning("child ignored SIGTERM; killing", extra={"child": child.name})
    proc.kill()
    with trio.move_on_after(5):
        await child.exited.wait()


async def _hurry(signals: AsyncIterator[int], vmmgr: Child) -> None:
    """A second Ctrl-C while vmmgr pauses capsules: its second SIGTERM stops it at once."""
    async for _ in signals:
        if vmmgr.process is not None and vmmgr.process.returncode is None:
            log.warning("stopping vmmgr at once: capsules not yet paused keep running")
            vmmgr.process.send_signal(signal.SIGTERM)


async def wait_healthy(url: str, timeout_s: float) -> bool:
    """Poll ``url`` until it answers 200 or ``timeout_s`` passes."""
    with trio.move_on_after(timeout_s):
        while True:
            if await trio.to_thread.run_sync(_get_status, url) == 200:
                return True
            await trio.sleep(0.25)
    return False


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def run_up(options: UpOptions) -> int:
    """Run the suite until Ctrl-C/SIGTERM; returns the exit status."""
    options.data_dir.mkdir(parents=True, exist_ok=True)
    database_url = os.environ.get("DATABASE_URL")
    pg = None
    if not database_url:
        log.info("starting embedded PostgreSQL", extra={"data_dir": str(options.data_dir)})
        pg = await trio.to_thread.run_sync(start_embedded_postgres, options.data_dir)
        database_url = pg.url
    env = suite_environment(options, database_url)
    broker = Child("broker")
    services = [Child(name) for name in SERVICES]
    gateway = Child("gateway")
    status = 0
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for child in [broker, *services, gateway]:
                    nursery.start_soon(supervise, child, env, options)
                url = f"http://{options.host}:{options.port}"
                async with trio.open_nursery() as waiting:

                    async def announce() -> None:
                        if await wait_healthy(url + "/healthz", options.ready_timeout_s):
                            print(f"Dovecote is up: {url}  (Ctrl-C to stop)", flush=True)
                            # then the guest image and template builds, until capsules are ready
                            await watch_capsules(url + "/healthz")
                        else:
                            print(f"Dovecote did not become healthy within "
                                  f"{options.ready_timeout_s:.0f}s; see {url}/healthz",
                                  file=sys.stderr, flush=True)

                    waiting.start_soon(announce)
                    async for signum in signals:
                        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
                        waiting.cancel_scope.cancel()
                        break
                await stop_child(gateway, options.grace_s)
                vmmgr = next(child for child in services if child.name == "vmmgr")
                if not options.keep_running:
                    print(f"Pausing capsules (up to {options.vm_stop_timeout_s:.0f}s; "
                          "Ctrl-C again to stop at once and leave the rest running)", flush=True)
                    nursery.start_soon(_hurry, signals, vmmgr)
                await stop_child(vmmgr, options.vmmgr_grace_s())
                async with trio.open_nursery() as stopping:
                    for child in services:
                        stopping.start_soon(stop_child, child, options.grace_s)
                await stop_child(broker, options.grace_s)
                nursery.cancel_scope.cancel()
    finally:
        if pg is not None:
            await trio.to_thread.run_sync(pg.stop)
    log.info("suite stopped")
    return status
