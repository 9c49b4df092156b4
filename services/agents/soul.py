"""Soul documents: markdown with YAML front matter, validated without I/O.

A soul is what an agent is told about itself: ``role``, ``tone``,
``principles``, ``constraints``, ``collaboration``, ``memory_policy``,
``tags`` and ``version`` in the front matter, free markdown after it::

    ---
    role: reviewer
    tone: [direct, kind]
    principles:
      - read the whole diff first
    version: "1"
    ---
    # Notes
    ...

:func:`parse` never raises on bad content: every problem is a
:class:`~dovecote.bus.messages.agents.SoulDiagnostic` with its line and column
(1-based, in the whole document), field and severity. Any ``error``
diagnostic makes the document invalid (``validation_status: invalid``); a
document over ``max_bytes`` is not parsed at all. A body over
``max_body_bytes`` is valid but cut in projections (``truncated``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from dovecote.bus.messages.agents import Severity, SoulDiagnostic, SoulFrontmatter

LIST_FIELDS = ("tone", "principles", "constraints", "collaboration", "memory_policy", "tags")
TEXT_FIELDS = ("role", "version")
FIELDS = TEXT_FIELDS + LIST_FIELDS
MAX_ITEM_CHARS = 500
MAX_ITEMS = 64


@dataclass(kw_only=True)
class ParsedSoul:
    frontmatter: SoulFrontmatter
    body: str
    diagnostics: list[SoulDiagnostic] = field(default_factory=list)
    digest: str = ""
    truncated: bool = False

    @property
    def valid(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _diag(
    code: str,
    message: str,
    *,
    line: int = 1,
    column: int = 1,
    field_name: str = "",
    severity: Severity = "error",
    section: str = "frontmatter",
) -> SoulDiagnostic:
    return SoulDiagnostic(
        code=code,
        message=message,
        line=line,
        column=column,
        field=field_name,
        severity=severity,
        section=section,
    )


def parse(text: str, *, max_bytes: int, max_body_bytes: int) -> ParsedSoul:
    """Split, parse and validate a soul document."""
    out = ParsedSoul(frontmatter=SoulFrontmatter(), body="", digest=digest_of(text))
    size = len(text.encode())
    if size > max_bytes:
        out.diagnostics.append(
            _diag(
                "soul_too_large",
                f"the document is {size} bytes, over max_bytes {max_bytes}",
                section="document",
            )
        )
        return out
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].rstrip("\r\n") != "---":
        out.body = text
        out.diagnostics.append(
            _diag("frontmatter_missing", "the document must start with a '---' front matter block")
        )
        return out
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip("\r\n") in ("---", "...")), None)
    if end is None:
        out.diagnostics.append(
            _diag("frontmatter_unterminated", "the front matter has no closing '---' line")
        )
        return out
    out.body = "".join(lines[end + 1 :])
    if len(out.body.encode()) > max_body_bytes:
        out.truncated = True
        out.diagnostics.append(
            _diag(
                "body_truncated",
                f"the body is over max_body_bytes {max_body_bytes}; projections cut it",
                line=end + 2,
                severity="warning",
                section="body",
            )
        )
    source = "".join(lines[1:end])
    try:
        loader = yaml.SafeLoader(source)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 2 if mark is not None else 2
        column = mark.column + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        out.diagnostics.append(
            _diag("frontmatter_yaml", f"invalid YAML: {problem}", line=line, column=column)
        )
        return out
    if data is None:
        data = {}
    if not isinstance(data, dict):
        out.diagnostics.append(
            _diag("frontmatter_not_mapping", "the front matter must be a mapping of fields", line=2)
        )
        return out
    marks: dict[str, tuple[int, int]] = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            marks[str(key.value)] = (key.start_mark.line + 2, key.start_mark.column + 1)
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key)
        line, column = marks.get(name, (2, 1))
        if name not in FIELDS:
            out.diagnostics.append(
                _diag(
                    "unknown_field",
                    f"unknown front matter field {name!r}",
                    line=line,
                    column=column,
                    field_name=name,
                    severity="warning",
                )
            )
            continue
        if name in TEXT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                out.diagnostics.append(
                    _diag(
                        "invalid_type", f"{name} must be a string", line=line, column=column, field_name=name
                    )
                )
                continue
            text_value = str(value)
            if len(text_value) > MAX_ITEM_CHARS:
                out.diagnostics.append(
                    _diag(
                        "too_long",
                        f"{name} is over {MAX_ITEM_CHARS} characters",
                        line=line,
                        column=column,
                        field_name=name,
                    )
                )
                continue
            values[name] = text_value
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            out.diagnostics.append(
                _diag(
                    "invalid_type",
                    f"{name} must be a list of strings",
                    line=line,
                    column=column,
                    field_name=name,
                )
            )
            continue
        if len(value) > MAX_ITEMS or any(len(v) > MAX_ITEM_CHARS for v in value):
            out.diagnostics.append(
                _diag(
                    "too_long",
                    f"{name} has over {MAX_ITEMS} items or an item over {MAX_ITEM_CHARS} characters",
                    line=line,
                    column=column,
                    field_name=name,
                )
            )
            continue
        values[name] = list(value)
    if "role" not in data:
        out.diagnostics.append(
            _diag(
                "role_missing", "the front matter has no role", line=2, field_name="role", severity="warning"
            )
        )
    out.frontmatter = SoulFrontmatter(**values)
    return out
