"""A bus worker in its own process (endpoints from DOVECOTE_BUS_*), for SIGKILL tests."""

from __future__ import annotations

import sys

import trio

from dovecote.bus import BusEndpoints, open_bus

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from messages_for_tests import Echo, EchoReply


async def main(service: str) -> None:
    async def handler(msg: Echo) -> EchoReply:
        await trio.sleep(msg.delay)
        return EchoReply(text=msg.text, worker="proc")

    async with open_bus(BusEndpoints.from_env(), "proc", heartbeat=0.1) as bus:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.serve, service, handler)
            print("ready", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
