"""The one base Struct of every bus message, and the message families that decode them.

Every concrete message subclasses :class:`Message` with a unique dotted tag
(``class Ping(Message, tag="health.ping")``); the tag travels in the ``type``
field.  Classes whose tag has no dot (the default tag is the class name) are
abstract intermediate bases.

A message family is one module's messages (``capsules``, ``auth_teams``,
``runs`` ...).  The module declares it on its last line,
``FAMILY = Family("capsules", __name__)``, and the family builds its one
msgspec Decoder over the union of those messages right then, at import, as
``vmmgr/guest/protocol.py`` does; a message class defined after its module's
family raises ``TypeError``.  :func:`decode` reads the tag (the first field
msgspec writes), finds its family and decodes with that family's Decoder; a
server passes the families it serves (``Bus.serve(..., accepts=...)``), so a
message of another family is refused before any handler runs.  There is no
decoder over every registered message.

A request declares its reply: ``class LookupCapsule(Request[CapsuleReply],
tag="capsules.lookup")``.  ``Bus.request`` then returns a ``CapsuleReply``
(typed for mypy, checked at decode) or raises the refusal as a
:class:`~dovecote.libs.errors.ServiceError`.  Each request class decodes its
replies with its own small Decoder (the reply type and ``Failure``), built
once on first use (the reply type may be a forward reference).

Unknown fields are ignored and new fields must have defaults, so old and new
services can talk to each other during a rolling upgrade.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Container
from typing import Any, ClassVar, ForwardRef, Generic, TypeVar, Union

import msgspec

_registry: list[type[Message]] = []
_lock = threading.Lock()
_families: dict[str, Family] = {}  # module name -> its family
_by_tag: dict[bytes, Family] = {}  # utf-8 tag -> the family that decodes it

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
            if cls.__module__ in _families:
                raise TypeError(f"{cls.__qualname__} is defined after {cls.__module__}'s "
                                "FAMILY line: define messages above it")
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


class Family:
    """One module's messages and the one Decoder of their union, built at construction.

    Args:
        name: The family's name (``"capsules"``), for errors and logs.
        module: The module whose concrete messages (dotted tags) make the family;
            the module's messages must all be defined before this call.

    Raises:
        ValueError: the module already has a family, has no messages, or a tag
            is claimed twice.
    """

    __slots__ = ("decoder", "messages", "module", "name")

    def __init__(self, name: str, module: str) -> None:
        self.name = name
        self.module = module
        with _lock:
            if module in _families:
                raise ValueError(f"{module} already declares its family")
            members = tuple(cls for cls in _registry if cls.__module__ == module
                            and isinstance(cls.__struct_config__.tag, str)
                            and "." in cls.__struct_config__.tag)
            if not members:
                raise ValueError(f"{module} declares no messages")
            tags: dict[bytes, type[Message]] = {}
            for cls in members:
                tag = str(cls.__struct_config__.tag).encode()
                other = tags.get(tag) or (_by_tag[tag].messages[tag] if tag in _by_tag else None)
                if other is not None:
                    raise ValueError(f"duplicate message tag {tag.decode()!r}: {other!r} and {cls!r}")
                tags[tag] = cls
            self.messages: dict[bytes, type[Message]] = tags
            self.decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
                Union[members])  # noqa: UP007
            _families[module] = self
            for tag in tags:
                _by_tag[tag] = self

    def __repr__(self) -> str:
        return f"Family({self.name!r}, {len(self.messages)} messages)"


def family_of(message_type: type[Message]) -> Family:
    """The family ``message_type`` belongs to.

    Raises:
        LookupError: its module declares no family (yet).
    """
    family = _families.get(message_type.__module__)
    if family is None:
        raise LookupError(f"{message_type.__module__} declares no message family "
                          f"(add FAMILY = Family(...) after its messages)")
    return family


class UnservedMessage(ValueError):
    """A known message of a family the receiver does not serve."""


class _Tagged(msgspec.Struct):
    type: str


_tag_decoder = msgspec.msgpack.Decoder(_Tagged)


def peek_tag(data: bytes | memoryview | msgspec.Raw) -> bytes:
    """The tag of an encoded message, read without decoding the rest.

    msgspec writes the tag first: ``{"type": tag, ...}``, a map header, the
    fixstr ``type`` and the tag as a fixstr or str8; anything else goes the
    slow way through a small Decoder.
    """
    b = data if type(data) is bytes else bytes(memoryview(data)[:48])
    head = b[0] if b else 0
    i = 1 if 0x80 <= head <= 0x8F else 3 if head == 0xDE else 5 if head == 0xDF else 0
    if i and b[i:i + 5] == b"\xa4type":
        h = b[i + 5] if len(b) > i + 5 else 0
        if 0xA0 <= h <= 0xBF:
            return b[i + 6:i + 6 + (h & 0x1F)]
        if h == 0xD9 and len(b) > i + 6:
            return b[i + 7:i + 7 + b[i + 6]]
    return _tag_decoder.decode(data).type.encode()


def encode(msg: Message) -> bytes:
    """Encode a message to msgpack bytes."""
    return encoder.encode(msg)


def decode(data: bytes | memoryview | msgspec.Raw, families: Container[Family] | None = None
           ) -> Message:
    """Decode msgpack bytes with the Decoder of the family that declares its tag.

    Args:
        data: One encoded message.
        families: Accept only messages of these families (a server's), or any.

    Raises:
        msgspec.ValidationError: unknown tag or wrong field types.
        msgspec.DecodeError: not msgpack.
        UnservedMessage: a message of a family not in ``families``.
    """
    tag = peek_tag(data)
    family = _by_tag.get(tag)
    if family is None:
        raise msgspec.ValidationError(f"unknown message type {tag.decode(errors='replace')!r}")
    if families is not None and family not in families:
        raise UnservedMessage(f"{family.messages[tag].__name__} ({family.name}) is not served here")
    return family.decoder.decode(data)
