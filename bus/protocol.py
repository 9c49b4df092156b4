"""Frame layout of the RPC plane, without any I/O.

The RPC plane is Majordomo-like: one ROUTER socket in the broker, DEALER
sockets in clients and workers (no empty delimiter frame).  Every message
starts with a head frame: the protocol header saying who speaks (client or
worker, 4 bytes) and a one-byte command, followed for requests and replies by
their fixed-width fields.  Integers are fixed-width big-endian; ``corr`` is
8 bytes.  ``client`` below is the broker's ROUTER routing id of the client;
workers echo it back.

Requests and replies, the hot path, are two frames each way (a head and a
body), so a round trip costs few libzmq calls and few Python operations in
every process; streams and control messages keep one field per frame::

    C->B  [C_HDR REQUEST corr timeout_ms service,   envelope]
    B->C  [C_HDR REPLY corr,                         envelope]
    B->C  [C_HDR ERROR corr,                         ErrorReply]   handler error or refusal by the broker
    B->W  [W_HDR REQUEST corr timeout_ms client,     envelope]
    W->B  [W_HDR REPLY corr client,                  envelope]
    W->B  [W_HDR ERROR corr client,                  ErrorReply]

    C->B  [C_HDR STREAM_OPEN, service, sid, timeout_ms, window, envelope]
    C->B  [C_HDR STREAM,      sid, kind, seq, payload]
    B->C  [C_HDR STREAM,      sid, kind, seq, payload]
    W->B  [W_HDR READY,       service, capacity, heartbeat_ms]
    W->B  [W_HDR STREAM,      client, sid, kind, seq, payload]
    W->B  [W_HDR HEARTBEAT] / [W_HDR DISCONNECT]
    B->W  [W_HDR STREAM_OPEN, client, sid, timeout_ms, window, envelope]
    B->W  [W_HDR STREAM,      client, sid, kind, seq, payload]
    B->W  [W_HDR HEARTBEAT]  (also the acknowledgement of READY) / [W_HDR DISCONNECT]

(Version 2 of the layout: version 1 sent the header, the command and each
field as frames of their own, six or seven frames per message.  The headers
changed with it, ``DCC1``/``DCW1`` to ``DCC2``/``DCW2``, so a process of the
other version is dropped as "unknown header" instead of misread.)

The broker answers every worker HEARTBEAT with a HEARTBEAT, so each worker
detects a silent broker with its own interval; a worker the broker does not
know (after a broker restart) gets DISCONNECT and registers again.

Streams: ``kind`` is one of DATA_BYTES, DATA_MSG, CREDIT (``seq`` carries the
number of credits granted), EOF (sender finished; payload is empty or an
ErrorReply), CLOSE (the worker's handler finished; the broker forgets the
stream) and CANCEL (the client gave up).  The opener grants the worker
``window`` credits in STREAM_OPEN; the worker accepts by granting the client
``window`` credits in its first CREDIT frame.

The envelope carries the request id (``dovecote.libs.context.request_id``)
next to the message, so the id crosses the bus.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import msgspec

from .errors import UNSUPPORTED, BusError
from .messages.base import Family, Message, UnservedMessage, decode, encoder
from .messages.errors import ErrorReply

C_HDR = b"DCC2"
W_HDR = b"DCW2"
HDR_LEN = 4
CMD = slice(4, 5)
"""The command byte in a head frame."""
CORR = slice(5, 13)
"""The correlation id in the head of a REQUEST, REPLY or ERROR."""
REQ_TIMEOUT = slice(13, 17)
"""The timeout in the head of a REQUEST."""
REQ_TAIL = 17
"""Where a REQUEST head's service (client to broker) or client id (broker to worker) starts."""
REPLY_TAIL = 13
"""Where a worker's REPLY/ERROR head's client id starts."""

READY = b"\x01"
REQUEST = b"\x02"
REPLY = b"\x03"
ERROR = b"\x04"
HEARTBEAT = b"\x05"
DISCONNECT = b"\x06"
STREAM_OPEN = b"\x07"
STREAM = b"\x08"

DATA_BYTES = b"d"
DATA_MSG = b"m"
CREDIT = b"c"
EOF = b"e"
CLOSE = b"x"
CANCEL = b"k"


class ProtocolError(BusError, ValueError):
    """A frame list does not follow the layout above."""

    code = "protocol"


class Unsupported(ProtocolError):
    """A well-formed message of a family the receiving server does not serve."""

    code = UNSUPPORTED


def pack_u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def pack_u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def unpack_int(b: bytes) -> int:
    return int.from_bytes(b, "big")


def timeout_to_ms(timeout: float) -> bytes:
    return pack_u32(max(0, min(int(timeout * 1000), 0xFFFFFFFF)))


# -- envelope -----------------------------------------------------------------


class Envelope(msgspec.Struct, array_like=True):
    """What travels in the body frame: the request id and the encoded message."""

    request_id: str | None
    body: msgspec.Raw


_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(msg: Message, request_id: str | None) -> bytes:
    # The Envelope's array form, [request_id, message], without building one per message.
    return b"\x92" + (b"\xc0" if request_id is None else encoder.encode(request_id)) \
        + encoder.encode(msg)


def decode_envelope(data: bytes, families: Container[Family] | None = None
                    ) -> tuple[Message, str | None]:
    """Return ``(message, request_id)``.

    Args:
        data: The body frame.
        families: Accept only messages of these families (a server's), or any.

    Raises:
        Unsupported: a message of a family not in ``families``.
        ProtocolError: the bytes are not a valid envelope of a declared message.
    """
    try:
        env = _envelope_decoder.decode(data)
        return decode(env.body, families), env.request_id
    except UnservedMessage as exc:
        raise Unsupported(str(exc)) from None
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise ProtocolError(f"bad envelope: {exc}") from exc


def decode_reply(data: bytes, decoder: msgspec.msgpack.Decoder[Any]) -> Any:
    """The message of a reply envelope, decoded by the request's own ``decoder``.

    Raises:
        ProtocolError: not an envelope, or not one of the decoder's types.
    """
    try:
        return decoder.decode(_envelope_decoder.decode(data).body)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise ProtocolError(f"bad reply: {exc}") from exc


def encode_error(code: str, message: str = "") -> bytes:
    return encoder.encode(ErrorReply(code=code, message=message))


def decode_error(data: bytes) -> ErrorReply:
    try:
        msg = decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return ErrorReply(code="protocol", message=f"undecodable error reply: {exc}")
    if not isinstance(msg, ErrorReply):
        return ErrorReply(code="protocol", message=f"expected ErrorReply, got {type(msg)}")
    return msg


# -- client side ----------------------------------------------------------------


def client_request(service: str, corr: bytes, timeout: float, envelope: bytes) -> list[bytes]:
    return [C_HDR + REQUEST + corr + timeout_to_ms(timeout) + service.encode(), envelope]


def client_stream_open(
    service: str, sid: bytes, timeout: float, window: int, envelope: bytes
) -> list[bytes]:
    return [C_HDR + STREAM_OPEN, service.encode(), sid, timeout_to_ms(timeout), pack_u32(window),
            envelope]


def client_stream(sid: bytes, kind: bytes, seq: int, payload: bytes = b"") -> list[bytes]:
    return [C_HDR + STREAM, sid, kind, pack_u64(seq), payload]


# -- worker side ----------------------------------------------------------------


def worker_ready(service: str, capacity: int, heartbeat: float) -> list[bytes]:
    return [W_HDR + READY, service.encode(), pack_u32(capacity), timeout_to_ms(heartbeat)]


def worker_heartbeat() -> list[bytes]:
    return [W_HDR + HEARTBEAT]


def worker_disconnect() -> list[bytes]:
    return [W_HDR + DISCONNECT]


def worker_reply(client: bytes, corr: bytes, envelope: bytes) -> list[bytes]:
    return [W_HDR + REPLY + corr + client, envelope]


def worker_error(client: bytes, corr: bytes, code: str, message: str) -> list[bytes]:
    return [W_HDR + ERROR + corr + client, encode_error(code, message)]


def worker_stream(client: bytes, sid: bytes, kind: bytes, seq: int, payload: bytes = b""
                  ) -> list[bytes]:
    return [W_HDR + STREAM, client, sid, kind, pack_u64(seq), payload]


def check(frames: list[bytes], header: bytes, min_len: int = 1) -> bytes:
    """Validate the head frame's header and return the command byte.

    Raises:
        ProtocolError: wrong header, no command, or too few frames.
    """
    if len(frames) < min_len or len(frames[0]) <= HDR_LEN or frames[0][:HDR_LEN] != header:
        raise ProtocolError(f"bad frames (expected header {header!r}): {frames[:3]!r}")
    return frames[0][CMD]
