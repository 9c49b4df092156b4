"""Dovecote's message bus: RPC, events and streams over ZeroMQ, with msgspec frames.

Services use only what is listed here and never import zmq::

    from dovecote.bus import open_bus, BusEndpoints, RemoteError, BusTimeout

    async with open_bus(BusEndpoints.from_env(), name="auth") as bus:
        await nursery.start(bus.serve, "auth", handler)
        reply = await bus.request("auth", Ping(), timeout=5.0)
        await bus.publish("capsule.state.changed", event)
        async with bus.subscribe("capsule.") as events:
            async for topic, event in events: ...
        async with bus.open_stream("vmmgr", ExecStart(...)) as stream: ...

The broker runs in its own process (``run_broker`` / ``python -m
dovecote.bus.broker``) or, in tests and ``dovecote up``, in a thread via
``open_broker``.

Modules: ``client`` (Bus, open_bus), ``broker`` (BrokerCore, Broker,
run_broker, open_broker), ``protocol`` (frame layout, I/O-free), ``stream``
(credit flow control), ``zmqtrio`` (the only pyzmq/Trio adapter), ``curve``
(keys, ZAP), ``endpoints``, ``errors``, ``messages``.
"""

from .broker import Broker, BrokerCore, open_broker, run_broker
from .client import Bus, Subscription, open_bus
from .curve import BrokerSecurity, Keypair, generate_keypair
from .endpoints import BusEndpoints
from .errors import BusClosed, BusError, BusTimeout, CurveError, RemoteError
from .messages import ErrorReply, Message, Ping, Pong
from .stream import Stream, StreamStatistics

__all__ = [
    "Broker",
    "BrokerCore",
    "BrokerSecurity",
    "Bus",
    "BusClosed",
    "BusEndpoints",
    "BusError",
    "BusTimeout",
    "CurveError",
    "ErrorReply",
    "Keypair",
    "Message",
    "Ping",
    "Pong",
    "RemoteError",
    "Stream",
    "StreamStatistics",
    "Subscription",
    "generate_keypair",
    "open_broker",
    "open_bus",
    "run_broker",
]
