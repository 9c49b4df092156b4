"""``dovecote probe SERVICE``: is a service alive on the bus? (health probes).

Kubernetes (``infra/k8s``) and other orchestrators run it as an exec probe:
it sends the health RPC (:class:`~dovecote.bus.messages.health.Ping`) to the
service through the broker and exits 0 when the service answers within the
timeout, 1 otherwise, printing one line either way. ``vmmgr`` is asked under
its host's own name (``vmmgr.<DOVECOTE_HOST_ID>``), so a probe checks the
vmmgr of its own node, not whichever host the broker would pick.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

from dovecote.bus.messages.health import Ping, Pong
from dovecote.services.client import open_cli_bus


def bus_name(service: str, environ: dict[str, str] | None = None) -> str:
    """The bus name that answers for ``service`` in this process's environment."""
    env = os.environ if environ is None else environ
    host_id = env.get("DOVECOTE_HOST_ID", "").strip()
    if service == "vmmgr" and host_id:
        return f"vmmgr.{host_id}"
    return service


async def probe(service: str, data_dir: Path, timeout_s: float) -> Pong:
    """Ping ``service`` over the suite's bus.

    Raises:
        dovecote.bus.BusError: the broker or the service did not answer in ``timeout_s``.
        trio.TooSlowError: connecting to the broker took too long.
    """
    with trio.fail_after(timeout_s + 1):
        async with open_cli_bus(data_dir) as bus:
            reply: Pong = await bus.request(bus_name(service), Ping(), timeout=timeout_s)
            return reply


def main(service: str, data_dir: Path, timeout_s: float) -> int:
    """Run the probe; the exit status is the verdict."""
    try:
        pong = trio.run(probe, service, data_dir, timeout_s)
    except Exception as exc:  # BusError, TooSlowError, OSError, or a group of them from the bus's nursery
        while isinstance(exc, ExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        print(f"{service}: no answer ({str(exc) or type(exc).__name__})", file=sys.stderr)
        return 1
    print(f"{service}: {pong.status} (up {pong.uptime_s:.0f} s)")
    return 0 if pong.status == "ok" else 1
