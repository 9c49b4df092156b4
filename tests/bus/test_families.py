"""Message families: one Decoder per family, built at import; a server refuses other families."""

from __future__ import annotations

import types
from pathlib import Path

import msgspec
import pytest
import trio

from dovecote.bus import BusEndpoints, RemoteError, open_broker, open_bus
from dovecote.bus import messages as m
from dovecote.bus.messages import base, capsules, health
from dovecote.bus.messages.base import Family, Message, decode, encode, family_of, peek_tag

from .messages_for_tests import FAMILY as TEST_FAMILY
from .messages_for_tests import Echo, EchoReply


def test_every_message_module_declares_its_family() -> None:
    folder = Path(m.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "base"}
    declared = {f.module.rsplit(".", 1)[1] for f in base._families.values()
                if f.module.startswith("dovecote.bus.messages.")}
    assert modules <= declared, f"modules without FAMILY: {modules - declared}"
    for tag, cls in m.registered_messages().items():
        assert family_of(cls).messages[tag.encode()] is cls


def test_decode_uses_the_family_of_the_tag() -> None:
    msg = decode(encode(health.Ping()))
    assert type(msg) is health.Ping
    with pytest.raises(msgspec.ValidationError, match=r"unknown message type 'nope\.nope'"):
        decode(msgspec.msgpack.encode({"type": "nope.nope"}))
    with pytest.raises(m.UnservedMessage, match="not served"):
        decode(encode(health.Ping()), {capsules.FAMILY})
    assert type(decode(encode(health.Ping()), {health.FAMILY})) is health.Ping


def test_peek_tag_reads_long_tags_and_odd_layouts() -> None:
    tag = "x" * 40
    assert peek_tag(msgspec.msgpack.encode({"type": tag, "a": 1})) == tag.encode()
    assert peek_tag(msgspec.msgpack.encode({"a": 1, "type": "late.tag"})) == b"late.tag"
    assert peek_tag(msgspec.Raw(encode(health.Ping()))) == b"health.ping"


def test_a_message_defined_after_its_family_line_is_refused() -> None:
    mod = types.ModuleType("dovecote_test_late_family")
    exec(
        "from dovecote.bus.messages.base import Family, Message\n"
        "class First(Message, tag='late.first'):\n    n: int = 0\n"
        "FAMILY = Family('late', __name__)\n", mod.__dict__)
    with pytest.raises(TypeError, match="after dovecote_test_late_family's FAMILY line"):
        exec("class Second(Message, tag='late.second'):\n    pass\n", mod.__dict__)
    with pytest.raises(ValueError, match="already declares its family"):
        Family("late", "dovecote_test_late_family")
    assert type(decode(encode(mod.First(n=3)))) is mod.First


async def test_a_server_refuses_a_family_it_does_not_serve(tmp_path: Path) -> None:
    ep = BusEndpoints.local(tmp_path)

    async def handler(msg: Message) -> Message:
        return EchoReply(text=getattr(msg, "text", "pong"))

    with trio.fail_after(20):
        async with open_broker(ep), open_bus(ep, "families") as bus, trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: bus.serve(
                "tests-only", handler, accepts={TEST_FAMILY}, task_status=task_status))
            reply = await bus.request("tests-only", Echo(text="hi"))
            assert reply == EchoReply(text="hi")
            with pytest.raises(RemoteError) as info:
                await bus.request("tests-only", health.Ping())
            assert info.value.code == "unsupported"
            assert "Ping (health) is not served here" in info.value.message
            nursery.cancel_scope.cancel()


def test_an_enumerated_field_is_refused_at_decode() -> None:
    actor = m.Principal(auth_type="session", user_id="u1", team_id="t1")
    ok = capsules.KillProcess(actor=actor, capsule_id="c1", selector="pid:1", signal="SIGTERM")
    assert decode(encode(ok), {capsules.FAMILY}) == ok
    wire = msgspec.msgpack.decode(encode(ok))
    wire["signal"] = "SIGSTOP"
    with pytest.raises(msgspec.ValidationError, match="signal"):
        decode(msgspec.msgpack.encode(wire), {capsules.FAMILY})


def test_the_envelope_is_written_as_msgspec_would() -> None:
    from dovecote.bus import protocol as P

    for rid in (None, "r-1", "x" * 300):
        wire = P.encode_envelope(health.Ping(), rid)
        assert wire == encode(P.Envelope(rid, msgspec.Raw(encode(health.Ping()))))  # type: ignore[arg-type]
        assert P.decode_envelope(wire) == (health.Ping(), rid)
