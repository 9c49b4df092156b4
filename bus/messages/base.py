"""The one base Struct of every bus message, and the registry that decodes them.

Every concrete message subclasses :class:`Message` with a unique dotted tag
(``class Ping(Message, tag="health.ping")``); the tag travels in the ``type``
field.  Subclassing registers the class, and :func:`decode` uses one msgspec
Decoder over the union of all registered classes.  The Decoder is built lazily
and rebuilt only when the registry has grown since (importing a new message
module), so in steady state decoding costs one dict lookup plus msgspec.

Classes whose tag has no dot (the default tag is the class name) are treated
as abstract intermediate bases and left out of the union.

Unknown fields are ignored and new fields must have defaults, so old and new
services can talk to each other during a rolling upgrade.
"""

from __future__ import annotations

import threading
from typing import Any, Union

import msgspec

_registry: list[type[Message]] = []
_lock = threading.Lock()
_decoder: msgspec.msgpack.Decoder[Any] | None = None
_decoder_size = -1

encoder = msgspec.msgpack.Encoder()


class Message(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=False):
    # Note: msgspec does not inherit kw_only; subclasses that put a required field
    # after a defaulted one pass kw_only=True themselves.
    """Base of all bus messages; subclasses need ``tag="domain.name"``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # msgspec fills __struct_config__ after this hook, so tags are read lazily.
        with _lock:
            _registry.append(cls)


def registered_messages() -> dict[str, type[Message]]:
    """Return ``{tag: class}`` of every concrete registered message.

    Raises:
        ValueError: two classes claim the same tag.
    """
    out: dict[str, type[Message]] = {}
    with _lock:
        classes = list(_registry)
    for cls in classes:
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str) or "." not in tag:
            continue
        if tag in out and out[tag] is not cls:
            raise ValueError(f"duplicate message tag {tag!r}: {out[tag]!r} and {cls!r}")
        out[tag] = cls
    return out


def _get_decoder() -> msgspec.msgpack.Decoder[Any]:
    global _decoder, _decoder_size
    size = len(_registry)
    if _decoder is None or size != _decoder_size:
        types = tuple(registered_messages().values())
        if not types:
            raise ValueError("no Message subclasses are registered")
        union = types[0] if len(types) == 1 else Union[types]  # noqa: UP007
        _decoder = msgspec.msgpack.Decoder(union)
        _decoder_size = size
    return _decoder


def encode(msg: Message) -> bytes:
    """Encode a message to msgpack bytes."""
    return encoder.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    """Decode msgpack bytes into the registered message class named by its tag.

    Raises:
        msgspec.ValidationError: unknown tag or wrong field types.
    """
    return _get_decoder().decode(data)
