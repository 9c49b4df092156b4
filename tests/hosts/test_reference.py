"""The hosts plane of the capsules reference is served and documented, and
``dovecote vmmgr --register`` reports a refused registration."""

from __future__ import annotations

import httpx

from tests.helpers.reference import reference_operations
from tests.helpers.suite import Suite

SKIPPED: set[tuple[str, str]] = set()


def test_every_hosts_operation_of_the_reference_is_documented(api_suite: Suite) -> None:
    expected = {op for op in reference_operations() if op[1].startswith("/v1/hosts")} - SKIPPED
    assert len(expected) == 13
    doc = httpx.get(api_suite.url + "/openapi.json").json()
    served = {(method, path) for path, methods in doc["paths"].items() for method in methods}
    assert sorted(expected - served) == []


def test_vmmgr_register_with_a_bad_token_stops_with_the_reason(api_suite: Suite) -> None:
    result = api_suite.cli("vmmgr", "--register", "not-a-token", "--control-plane", api_suite.url)
    assert result.returncode == 1
    assert "registration refused: 401 invalid_token" in result.stderr
    result = api_suite.cli("vmmgr", "--register", "t")
    assert result.returncode == 1 and "--control-plane" in result.stderr


def test_every_operation_of_the_capsules_reference_is_served(api_suite: Suite) -> None:
    expected = set(reference_operations())
    assert len(expected) > 100
    doc = httpx.get(api_suite.url + "/openapi.json").json()
    served = {(method, path) for path, methods in doc["paths"].items() for method in methods}
    assert sorted(expected - served) == []
