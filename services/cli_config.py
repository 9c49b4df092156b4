"""Where the ``dovecote`` client commands find the gateway and their API key.

``dovecote capsule ...`` talks to the public API like any other client. It
takes its settings from, in order:

1. the environment: ``DOVECOTE_URL`` (the gateway) and ``DOVECOTE_API_KEY``;
2. the config file, ``$DOVECOTE_CONFIG``, else
   ``$XDG_CONFIG_HOME/dovecote/config.toml``, else
   ``~/.config/dovecote/config.toml``, with ``url`` and ``api_key``;
3. the default gateway, ``http://127.0.0.1:8080`` (``dovecote up``'s).

``dovecote key create`` writes the file (mode 0600, in a 0700 directory),
keeping whatever else it holds.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

DEFAULT_URL = "http://127.0.0.1:8080"
ENV_URL = "DOVECOTE_URL"
ENV_API_KEY = "DOVECOTE_API_KEY"
ENV_CONFIG = "DOVECOTE_CONFIG"


class ConfigFileError(Exception):
    """The config file exists but cannot be read (the message names it)."""


class ClientSettings(msgspec.Struct, kw_only=True, frozen=True):
    url: str
    api_key: str | None
    config_path: Path


def config_path() -> Path:
    """The config file's path (it may not exist)."""
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dovecote" / "config.toml"


def read_config(path: Path) -> dict[str, Any]:
    """The file's table, ``{}`` when there is no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigFileError(f"{path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: not valid TOML ({exc})") from None


def load_settings() -> ClientSettings:
    """The settings from the environment, the config file and the defaults."""
    path = config_path()
    table = read_config(path)
    url = os.environ.get(ENV_URL) or str(table.get("url") or DEFAULT_URL)
    key = os.environ.get(ENV_API_KEY) or table.get("api_key") or None
    return ClientSettings(url=url.rstrip("/"), api_key=None if key is None else str(key),
                          config_path=path)


def save_settings(values: dict[str, str], path: Path | None = None) -> Path:
    """Set ``values`` in the config file (other entries kept); returns its path."""
    path = path or config_path()
    table = read_config(path)
    table.update(values)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lines = ["# dovecote client settings (dovecote key create); see services/cli_config.py"]
    for name, value in table.items():
        if isinstance(value, bool):
            lines.append(f"{name} = {str(value).lower()}")
        elif isinstance(value, (str, int, float)):
            # A JSON string or number is a valid TOML one.
            lines.append(f"{name} = {json.dumps(value)}")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
