"""Typed configuration read from environment variables.

A service declares its settings as a msgspec Struct; every field is read from
``DOVECOTE_<FIELD>`` (upper case) unless the class names another variable in
``__env__`` (``DATABASE_URL`` and the S3 variables keep their usual names).
Values are converted with msgspec's lax string conversion, so ``"8080"`` becomes
an int and ``"true"``/``"0"`` a bool. A value that does not convert raises
:class:`~dovecote.libs.errors.ConfigError` naming the variable and the value's
problem: a service with a bad setting refuses to start instead of guessing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec

from dovecote.libs.errors import ConfigError

__all__ = ["BaseConfig", "env_name", "load_config"]

C = TypeVar("C", bound=msgspec.Struct)

class BaseConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Settings every Dovecote process shares."""

    __env__: ClassVar[dict[str, str]] = {"database_url": "DATABASE_URL"}

    data_dir: str = ".dovecote"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    log_file_max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 10 * 1024 * 1024
    """A service's log file (``<data dir>/logs/<service>.log``) is rotated at this size."""
    log_file_backups: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    database_url: str | None = None
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    host_id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")] = "local"


def env_name(cls: type[msgspec.Struct], field: str) -> str:
    """Return the environment variable that feeds ``field`` of ``cls``."""
    overrides: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        overrides.update(getattr(klass, "__env__", {}) or {})
    return overrides.get(field, f"DOVECOTE_{field.upper()}")


def load_config(cls: type[C], environ: Mapping[str, str] | None = None) -> C:
    """Build ``cls`` from the environment, failing loudly on a bad value.

    Args:
        cls: a msgspec Struct whose fields all have defaults or are required.
        environ: the variables to read (``os.environ`` when omitted).

    Raises:
        ConfigError: a variable does not convert to its field's type, a
            required variable is missing, or a ``constraint fails.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        name = env_name(cls, field.name)
        if name in env and env[name] != "":
            raw[field.name] = env[name]
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(cls, str(exc))) from None


def _explain(cls: type[msgspec.Struct], message: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.port`"; name the variable.
    if "$." in message:
        field = message.rsplit("$.", 1)[1].split("[", 1)[0].strip("`")
        return f"invalid {env_name(cls, field)}: {message.rsplit(' - at', 1)[0]}"
    if "missing required field" in message:
        field = message.rsplit("`", 2)[-2]
        return f"missing required setting {env_name(cls, field)}"
    return f"invalid configuration for {cls.__name__}: {message}"
