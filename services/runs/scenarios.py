"""Scenarios: folders of ``manifest.json`` + ``prompt.md``, built in and from a configured directory.

A scenario is found by its folder name or its manifest ``id`` (the configured
directory wins over the built-in set on a clash). Its ``input_schema`` (JSON
Schema) checks a run's ``input``: the first problem is a 400 naming the field.
Property ``default`` values fill what the input leaves out.

Placeholders: ``{{input}}`` is the whole input as JSON, ``{{input.name}}`` one
field (a list renders space-separated, for shell loops; the built-in schemas
restrict such values to safe names). ``steps`` is the scripted agent's own
action list: desktop action kinds, plus ``wait {seconds}`` and
``wait_for_window {name | class, timeout_s}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import msgspec

from dovecote.bus.messages import runs as r
from dovecote.libs.errors import ServiceError
from dovecote.libs.logs import get_logger

log = get_logger("dovecote.runs.scenarios")

BUILTIN_DIR = Path(__file__).parent / "builtin_scenarios"
PLACEHOLDER = re.compile(r"\{\{\s*input(?:\.([A-Za-z0-9_]+))?\s*\}\}")


@dataclass(kw_only=True)
class LoadedScenario:
    info: r.Scenario
    steps: list[dict[str, Any]] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None


def wire_error(status: int, message: str, code: str = "invalid_request") -> ServiceError:
    """A refusal whose HTTP body is the reference's plain ``{"error": message}``."""
    return ServiceError(status, code, message, details={"wire": {"error": message}})


def load_folder(folder: Path, *, builtin: bool) -> LoadedScenario | None:
    try:
        raw = json.loads((folder / "manifest.json").read_text())
        prompt = (folder / "prompt.md").read_text() if (folder / "prompt.md").exists() else ""
        steps = raw.pop("steps", [])
        policy = raw.pop("policy", {})
        raw.update(folder=folder.name, prompt=prompt, builtin=builtin)
        info = msgspec.convert(raw, r.Scenario)
        if info.input_schema:
            jsonschema.Draft202012Validator.check_schema(info.input_schema)
    except (OSError, ValueError, msgspec.ValidationError, jsonschema.SchemaError) as exc:
        log.warning("a scenario folder is not valid", extra={"folder": str(folder), "error": str(exc)[:300]})
        return None
    return LoadedScenario(info=info, steps=list(steps), policy=dict(policy), folder=folder)


class Scenarios:
    """The scenarios of this service: the built-in set and the configured directory."""

    def __init__(self, directory: str = "") -> None:
        self.directory = Path(directory) if directory else None

    def all(self) -> list[LoadedScenario]:
        found: dict[str, LoadedScenario] = {}
        roots = [(BUILTIN_DIR, True)] + ([(self.directory, False)] if self.directory else [])
        for root, builtin in roots:
            if not root.is_dir():
                continue
            for folder in sorted(root.iterdir()):
                if folder.is_dir() and (folder / "manifest.json").exists():
                    loaded = load_folder(folder, builtin=builtin)
                    if loaded is not None:
                        found[loaded.info.id] = loaded
        return sorted(found.values(), key=lambda s: s.info.id)

    def find(self, key: str) -> LoadedScenario:
        for scenario in self.all():
            if key in (scenario.info.id, scenario.info.folder):
                return scenario
        raise wire_error(400, f"Unknown scenario: {key}", "unknown_scenario")


def validate_input(scenario: r.Scenario, value: dict[str, Any]) -> dict[str, Any]:
    """``value`` with defaults filled, or a 400 naming the first field that fails the schema."""
    schema = scenario.input_schema or {"type": "object"}
    filled = dict(value)
    for name, prop in (schema.get("properties") or {}).items():
        if name not in filled and isinstance(prop, dict) and "default" in prop:
            filled[name] = prop["default"]
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(filled), key=lambda e: list(e.absolute_path)
    )
    if errors:
        error = errors[0]
        path = ".".join(str(p) for p in error.absolute_path)
        if not path and error.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", error.message)
            path = missing[0] if missing else ""
        if not path and error.validator == "additionalProperties":
            extra = re.findall(r"'([^']+)'", error.message)
            path = extra[0] if extra else ""
        field_name = f"input.{path}" if path else "input"
        message = f"Invalid input: {field_name}: {error.message}"
        raise ServiceError(
            400, "invalid_input", message, details={"wire": {"error": message, "field": field_name}}
        )
    return filled


def render(text: str, value: dict[str, Any]) -> str:
    """``text`` with its ``{{input}}`` / ``{{input.name}}`` placeholders filled from ``value``."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return json.dumps(value)
        item = value.get(name, "")
        if isinstance(item, list):
            return " ".join(str(x) for x in item)
        return str(item)

    return PLACEHOLDER.sub(one, text)


def render_tree(obj: Any, value: dict[str, Any]) -> Any:
    """Every string inside ``obj`` rendered (for steps and verifiers)."""
    if isinstance(obj, str):
        return render(obj, value)
    if isinstance(obj, list):
        return [render_tree(x, value) for x in obj]
    if isinstance(obj, dict):
        return {k: render_tree(v, value) for k, v in obj.items()}
    return obj
