"""The typed request contract: a declared reply comes back as that type, a refusal is raised.

A handler refuses with :class:`~dovecote.libs.errors.ServiceError`; the caller's
``Bus.request`` raises the same error (the subclass of its status, with code,
message, details and retry_after), through a real broker, for requests and
for streams.
"""

from __future__ import annotations

import pickle
from functools import partial

import pytest
import trio

from dovecote.bus import Bus, RemoteError, Stream
from dovecote.bus.messages import Failure, decode, encode
from dovecote.libs.errors import (
    Conflict,
    DovecoteError,
    NotFound,
    RateLimited,
    ServiceError,
)

from .messages_for_tests import Echo, EchoReply, Later, LaterReply, Lookup


async def handler(msg):
    if isinstance(msg, Lookup):
        if msg.refuse == 404:
            raise ServiceError(404, "not_found", f"no {msg.key}", details={"key": msg.key})
        if msg.refuse == 429:
            raise ServiceError(429, "quota", "slow down", retry_after=7)
        if msg.refuse == 1:  # a handler that answers another type than it declares
            return LaterReply(n=1)
        return EchoReply(text=msg.key)
    if isinstance(msg, Later):
        return LaterReply(n=msg.n + 1)
    if isinstance(msg, Echo):
        raise ServiceError(409, "busy", "not now")
    raise AssertionError(msg)


async def stream_handler(msg: Echo, stream: Stream) -> None:
    await stream.send(EchoReply(text="first"))
    raise ServiceError(404, "gone", f"{msg.text} went away")


async def test_declared_reply_is_returned_as_its_type(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(bus.serve, "typed", handler)
            reply = await bus.request("typed", Lookup(key="k"), timeout=2)
            later = await bus.request("typed", Later(n=1), timeout=2)
        nursery.cancel_scope.cancel()
    assert reply == EchoReply(text="k")
    assert later == LaterReply(n=2)


async def test_refusal_is_raised_with_status_code_and_details(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(bus.serve, "typed", handler)
            with pytest.raises(NotFound) as missing:
                await bus.request("typed", Lookup(key="k", refuse=404), timeout=2)
            with pytest.raises(RateLimited) as limited:
                await bus.request("typed", Lookup(key="k", refuse=429), timeout=2)
            with pytest.raises(Conflict) as untyped:  # a plain Message refused: raised as well
                await bus.request("typed", Echo(text="x"), timeout=2)
        nursery.cancel_scope.cancel()
    err = missing.value
    assert (err.status, err.code, err.message, err.details) == (404, "not_found", "no k", {"key": "k"})
    assert isinstance(err, ServiceError) and isinstance(err, DovecoteError)
    assert (limited.value.status, limited.value.retry_after) == (429, 7)
    assert (untyped.value.status, untyped.value.code) == (409, "busy")


async def test_a_reply_of_another_type_than_declared_is_a_protocol_error(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(bus.serve, "typed", handler)
            with pytest.raises(RemoteError) as wrong:
                await bus.request("typed", Lookup(key="k", refuse=1), timeout=2)
        nursery.cancel_scope.cancel()
    assert wrong.value.code == "protocol"


async def test_stream_refusal_is_raised_after_the_frames_before_it(bus: Bus):
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(partial(bus.serve, "typed", handler, stream_handler=stream_handler))
            seen = []
            async with bus.open_stream("typed", Echo(text="pty")) as stream:
                with pytest.raises(NotFound) as gone:
                    async for message in stream:
                        seen.append(message)
        nursery.cancel_scope.cancel()
    assert seen == [EchoReply(text="first")]
    assert (gone.value.code, gone.value.message) == ("gone", "pty went away")


def test_refusal_keeps_its_class_and_fields_across_pickling_and_the_wire_form():
    err = ServiceError(404, "not_found", "nope", details={"a": 1}, retry_after=None)
    assert type(err) is NotFound
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is NotFound and again.details == {"a": 1} and again.code == "not_found"
    assert type(ServiceError(418, "teapot", "short")) is ServiceError  # no subclass for 418
    wire = decode(encode(Failure(status=404, code="not_found", message="nope")))
    assert wire == Failure(status=404, code="not_found", message="nope", details=None)  # no details
