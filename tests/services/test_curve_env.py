"""CURVE configured through the environment, across real processes.

A ``dovecote broker`` that allows one client key serves a ``dovecote
notifier`` holding that key; a client with a key the broker does not know
gets no answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from dovecote.bus import (
    BusEndpoints,
    BusTimeout,
    Ping,
    Pong,
    RemoteError,
    generate_keypair,
    open_bus,
)
from dovecote.bus.curve import ENV_CLIENTS, ENV_PUBLIC, ENV_SECRET


def _keygen() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "dovecote.services.cli", "bus-keygen"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return dict(line.split("=", 1) for line in out.split())


async def test_a_curve_broker_serves_known_keys_and_ignores_unknown_ones(
        postgres_url: str, tmp_path: Path) -> None:
    server, service = _keygen(), _keygen()
    assert set(server) == {ENV_PUBLIC, ENV_SECRET}
    base = trio.Path("/tmp") / f"dccurve-{os.getpid()}"
    await base.mkdir(exist_ok=True)
    endpoints = BusEndpoints.local(str(base)).with_server_key(server[ENV_PUBLIC])
    common = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
    common.update(endpoints.to_env())
    probe = generate_keypair()
    broker_env = {**common, **server, ENV_CLIENTS: f"{service[ENV_PUBLIC]},{probe.public}"}
    service_env = {**common, **service, "DATABASE_URL": postgres_url,
                   "DOVECOTE_DATA_DIR": str(tmp_path)}
    procs = [
        await trio.lowlevel.open_process([sys.executable, "-m", "dovecote.services.cli", "broker"],
                                         env=broker_env, stderr=subprocess.DEVNULL),
        await trio.lowlevel.open_process([sys.executable, "-m", "dovecote.services.cli", "notifier"],
                                         env=service_env, stderr=subprocess.DEVNULL),
    ]
    try:
        with trio.fail_after(60):
            async with open_bus(endpoints, "probe", keypair=probe) as bus:
                while True:
                    try:
                        pong = await bus.request("notifier", Ping(), timeout=1)
                        break
                    except (BusTimeout, RemoteError):  # not registered yet
                        await trio.sleep(0.2)
                assert isinstance(pong, Pong) and pong.service == "notifier"
            async with open_bus(endpoints, "intruder", keypair=generate_keypair()) as bus:
                with pytest.raises(BusTimeout):
                    await bus.request("notifier", Ping(), timeout=2)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await proc.wait()
        await trio.to_thread.run_sync(shutil.rmtree, str(base), True)
