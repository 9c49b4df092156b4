"""The I/O-free half of the guest-agent protocol: framing, messages, credit windows."""

from __future__ import annotations

import msgspec
import pytest

from dovecote.vmmgr.guest import protocol as P
from dovecote.vmmgr.guest.agent.processes import OutputRing


def frames(*messages: P.Message) -> bytes:
    return b"".join(P.encode_frame(m) for m in messages)


def test_decoder_reassembles_frames_fed_one_byte_at_a_time() -> None:
    data = frames(P.Ping(id=1), P.Exec(id=2, cmd="echo hello"), P.Chunk(stream=2, seq=0, data=b"\xff" * 1000))
    decoder = P.FrameDecoder()
    bodies = []
    for i in range(len(data)):
        bodies += decoder.feed(data[i : i + 1])
    assert [type(P.decode_host_message(b)).__name__ for b in bodies] == ["Ping", "Exec", "Chunk"]
    assert decoder.buffered == 0


def test_decoder_returns_every_frame_of_one_feed_and_keeps_the_partial_rest() -> None:
    data = frames(P.Ping(id=1), P.Ping(id=2), P.Ping(id=3))
    decoder = P.FrameDecoder()
    bodies = decoder.feed(data[:-3])
    assert [P.decode_host_message(b).id for b in bodies] == [1, 2]
    assert decoder.buffered > 0
    assert [P.decode_host_message(b).id for b in decoder.feed(data[-3:])] == [3]


def test_decoder_refuses_a_frame_over_the_limit_before_buffering_it() -> None:
    decoder = P.FrameDecoder(max_frame=1024)
    with pytest.raises(P.ProtocolError, match="exceeds"):
        decoder.feed(P.HEADER.pack(1025))
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.FrameDecoder().feed(P.HEADER.pack(P.MAX_FRAME + 1) + b"x")


def test_encode_refuses_a_frame_over_the_limit() -> None:
    with pytest.raises(P.ProtocolError):
        P.encode_frame(P.WriteFile(id=1, path="/x", data=b"\0" * (P.MAX_FRAME + 1)))


def test_messages_round_trip_with_type_tags_and_bytes() -> None:
    msg = P.WriteFile(id=7, path="/tmp/x", data=b"\x00\xff", mode=0o600)
    (body,) = P.FrameDecoder().feed(P.encode_frame(msg))
    assert msgspec.msgpack.decode(body)["type"] == "WriteFile"
    assert P.decode_host_message(body) == msg
    reply = P.ExecResult(id=7, stdout="", stderr="", exit_code=0, duration_ms=1)
    assert P.decode_agent_message(P.encode_frame(reply)[4:]) == reply


def test_unknown_fields_are_ignored_and_missing_ones_get_defaults() -> None:
    body = msgspec.msgpack.encode({"type": "ListDir", "id": 3, "path": "/", "from_the_future": [1, 2]})
    assert P.decode_host_message(body) == P.ListDir(id=3, path="/", depth=1)


def test_a_reply_is_not_a_host_message_and_garbage_is_a_protocol_error() -> None:
    with pytest.raises(P.ProtocolError):
        P.decode_host_message(
            msgspec.msgpack.encode(
                P.Pong(id=1, agent_version="x", protocol=1, boot_id="", uptime=0, agent_uptime=0, agent_pid=1)
            )
        )
    with pytest.raises(P.ProtocolError):
        P.decode_agent_message(b"\xc1")


def test_send_window_never_sends_more_than_granted() -> None:
    window = P.SendWindow(2)
    assert [window.take(), window.take()] == [0, 1]
    assert not window.can_send()
    with pytest.raises(P.ProtocolError):
        window.take()
    window.grant(1)
    assert window.take() == 2
    with pytest.raises(P.ProtocolError):
        window.grant(0)


def test_receive_window_catches_gaps_and_credit_overruns() -> None:
    window = P.ReceiveWindow(2)
    window.receive(0)
    window.receive(1)
    with pytest.raises(P.ProtocolError, match="without credit"):
        window.receive(2)
    assert window.consumed(1) == 1
    window.receive(2)
    with pytest.raises(P.ProtocolError, match="seq"):
        window.receive(4)
    window.end(3)
    with pytest.raises(P.ProtocolError):
        P.ReceiveWindow(0)


def test_output_ring_drops_the_oldest_output_and_reports_what_was_skipped() -> None:
    ring = OutputRing(limit=10)
    ring.append("stdout", b"0123456")
    ring.append("stderr", b"789")
    assert ring.read(0, 100) == (0, 0, "stdout", b"0123456")
    assert ring.read(7, 100) == (0, 7, "stderr", b"789")
    ring.append("stderr", b"abcd")  # 14 bytes written, 10 kept: 4 dropped
    assert (ring.start, ring.end, ring.size) == (4, 14, 10)
    assert ring.read(0, 100) == (4, 4, "stdout", b"456")
    assert ring.read(8, 2) == (0, 8, "stderr", b"89")
    assert ring.read(14, 100) is None
    ring.append("stdout", b"x" * 25)  # one write larger than the ring
    assert ring.read(0, 100) == (29, 29, "stdout", b"x" * 10)
