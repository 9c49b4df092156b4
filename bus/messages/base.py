"""The one base Struct of every bus message, and the registry that decodes them.

Every concrete message subclasses :class:`Message` with a unique dotted tag
(``class Ping(Message, tag="health.ping")``); the tag travels in the ``type``
field.  Subclassing registers the class, and :func:`decode` uses one msgspec
Decoder over the union of all registered classes.  The Decoder is built lazily
and rebuilt only when the registry has grown since (importing a new message
module), so in steady state decoding costs one dict lookup plus msgspec.

Classes whose tag has no dot (the default tag is the class name) are treated
as abstract intermediate bases and left out of the union.

A request declares its reply: ``class LookupCapsule(Request[CapsuleReply],
tag="capsules.lookup")``.  ``Bus.request`` then returns a ``CapsuleReply``
(typed for mypy, checked at decode) or raises the refusal as a
:class:`~dovecote.libs.errors.ServiceError`.  Each request class decodes its
replies with its own small Decoder (the reply type and ``Failure``), built
once on first use; the union of everything registered is only for messages
whose type the receiver cannot know in advance (incoming requests, events,
stream frames).

Unknown fields are ignored and new fields must have defaults, so old and new
services can talk to each other during a rolling upgrade.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, ClassVar, ForwardRef, Generic, TypeVar, Union

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

    idempotent: ClassVar[bool] = False
    """Safe to send again when its worker was lost in flight (``Bus.request`` does)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # msgspec fills __struct_config__ after this hook, so tags are read lazily.
        with _lock:
            _registry.append(cls)


R = TypeVar("R", bound=Message)


class Request(Message, Generic[R]):
    """A message answered with one reply type ``R`` (or a refusal).

    Subclass as ``class Ask(Request[Answer], tag="domain.ask")``; the reply type
    may be a union (``Request[A | B]``) and may be a forward reference.
    """

    __reply_arg__: ClassVar[Any] = None
    __reply_decoder__: ClassVar[msgspec.msgpack.Decoder[Any] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):
            if getattr(base, "__origin__", None) is Request:
                cls.__reply_arg__ = base.__args__[0]
                cls.__reply_decoder__ = None

    @classmethod
    def reply_type(cls) -> Any:
        """The declared reply type (forward references resolved)."""
        arg = cls.__reply_arg__
        if isinstance(arg, str | ForwardRef):
            name = arg if isinstance(arg, str) else arg.__forward_arg__
            arg = eval(name, vars(sys.modules[cls.__module__]))
            cls.__reply_arg__ = arg
        return arg

    @classmethod
    def reply_decoder(cls) -> msgspec.msgpack.Decoder[Any]:
        """The Decoder of this request's replies: the reply type or a ``Failure``."""
        dec = cls.__dict__.get("__reply_decoder__")
        if dec is None:
            from .common import Failure

            reply = cls.reply_type()
            if reply is None or isinstance(reply, TypeVar):
                raise TypeError(f"{cls.__name__} does not declare its reply type")
            dec = msgspec.msgpack.Decoder(Union[reply, Failure])  # noqa: UP007
            cls.__reply_decoder__ = dec
        return dec


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
