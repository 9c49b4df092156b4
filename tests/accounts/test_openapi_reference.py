"""The gateway's /openapi.json covers the accounts plane of the capsules reference."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.helpers.suite import Suite

REFERENCE = Path(__file__).resolve().parents[3] / "shared/reference/wrenn-capsules-openapi.yaml.txt"
ACCOUNTS = re.compile(r"^(/v1/(auth|me|api-keys|users/search|teams|audit-logs|admin/users|admin/teams"
                      r"|admin/audit-logs)|/auth/oauth)")
METHODS = {"get", "post", "put", "patch", "delete"}


def reference_operations() -> set[tuple[str, str]]:
    """(method, path) of every operation in the reference (its YAML lost its indentation)."""
    ops: set[tuple[str, str]] = set()
    path = None
    for line in REFERENCE.read_text().splitlines():
        if re.match(r"^/[\w/{}.-]*:$", line):
            path = line[:-1]
        elif path and line.rstrip(":") in METHODS and line.endswith(":"):
            ops.add((line[:-1], path))
        elif line in ("components:",):
            break
    return ops


@pytest.mark.skipif(not REFERENCE.exists(), reason="the shared reference is not beside the repo")
def test_every_accounts_operation_of_the_reference_is_documented(api_suite: Suite) -> None:
    expected = {op for op in reference_operations() if ACCOUNTS.match(op[1])}
    assert len(expected) >= 40
    doc = httpx.get(api_suite.url + "/openapi.json").json()
    served = {(method, path) for path, methods in doc["paths"].items() for method in methods}
    assert sorted(expected - served) == []
