"""The gateway's /openapi.json covers the accounts plane of the capsules reference."""

from __future__ import annotations

import re

import httpx

from tests.helpers.reference import reference_operations
from tests.helpers.suite import Suite

ACCOUNTS = re.compile(r"^(/v1/(auth|me|api-keys|users/search|teams|audit-logs|admin/users|admin/teams"
                      r"|admin/audit-logs)|/auth/oauth)")


def test_every_accounts_operation_of_the_reference_is_documented(api_suite: Suite) -> None:
    expected = {op for op in reference_operations() if ACCOUNTS.match(op[1])}
    assert len(expected) >= 40
    doc = httpx.get(api_suite.url + "/openapi.json").json()
    served = {(method, path) for path, methods in doc["paths"].items() for method in methods}
    assert sorted(expected - served) == []
