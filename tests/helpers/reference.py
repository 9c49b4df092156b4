"""The capsules reference (``../shared/reference``), which every API test compares with.

CI always has it beside the repository: a test that needs it fails, never skips,
when it is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[3] / "shared/reference/wrenn-capsules-openapi.yaml.txt"
METHODS = {"get", "post", "put", "patch", "delete"}


def reference_text() -> str:
    """The reference's text; fails the test when it is not beside the repository."""
    if not REFERENCE.exists():
        pytest.fail(f"the capsules reference is missing: {REFERENCE} (../shared/reference)")
    return REFERENCE.read_text()


def reference_operations() -> set[tuple[str, str]]:
    """(method, path) of every operation in the reference (its YAML lost its indentation)."""
    ops: set[tuple[str, str]] = set()
    path = None
    for line in reference_text().splitlines():
        if re.match(r"^/[\w/{}.-]*:$", line):
            path = line[:-1]
        elif path and line.rstrip(":") in METHODS and line.endswith(":"):
            ops.add((line[:-1], path))
        elif line in ("components:",):
            break
    return ops
