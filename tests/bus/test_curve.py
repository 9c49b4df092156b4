"""CURVE: the broker accepts allow-listed client keys and ignores everyone else."""

from __future__ import annotations

import pytest
import trio

from dovecote.bus import (
    BrokerSecurity,
    BusTimeout,
    CurveError,
    generate_keypair,
    open_broker,
    open_bus,
)
from dovecote.bus.curve import check_key

from .conftest import HEARTBEAT
from .messages_for_tests import Echo, EchoReply, StateChanged


async def _echo(msg: Echo) -> EchoReply:
    return EchoReply(text=msg.text)


async def test_known_client_key_works_and_unknown_key_is_rejected(endpoints):
    server, known, stranger = generate_keypair(), generate_keypair(), generate_keypair()
    security = BrokerSecurity.create(server, allowed_clients=[known.public])
    secure = endpoints.with_server_key(server.public)
    with trio.fail_after(15):
        async with open_broker(secure, security=security), \
                open_bus(secure, "ok", keypair=known, heartbeat=HEARTBEAT) as bus, \
                trio.open_nursery() as nursery:
            await nursery.start(bus.serve, "echo", _echo)
            assert (await bus.request("echo", Echo(text="hi"), timeout=3)).text == "hi"
            async with bus.subscribe("s.") as events:  # event plane is CURVE too
                await bus.publish("s.x", StateChanged(capsule="c", state="s"))
                assert (await events.receive())[0] == "s.x"

            async with open_bus(secure, "bad", keypair=stranger) as intruder:
                with pytest.raises(BusTimeout):
                    await intruder.request("echo", Echo(text="hi"), timeout=0.5)
            # no server key at all: plain connection to a CURVE server fails too
            async with open_bus(endpoints, "plain") as plain:
                with pytest.raises(BusTimeout):
                    await plain.request("echo", Echo(text="hi"), timeout=0.5)
            nursery.cancel_scope.cancel()


def test_keys_are_z85_text_and_bad_keys_raise_curve_error():
    kp = generate_keypair()
    assert len(kp.public) == len(kp.secret) == 40
    assert check_key(kp.public) == kp.public.encode()
    assert kp.secret not in repr(kp)
    with pytest.raises(CurveError):
        check_key("not a key")
