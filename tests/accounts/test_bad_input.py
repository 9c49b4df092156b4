"""Property-based: bad input to any documented body gets a documented 4xx.

Every operation with a JSON request body in the gateway's own
``/openapi.json`` is sent generated garbage — arbitrary JSON values, bodies
missing required fields, fields of the wrong type, unknown fields, broken
JSON — both anonymously and with a signed-in session (so the body is really
parsed behind authentication). Whatever the input, the answer must be a 4xx
with the error body the operation documents for that status (the platform's
``{"error": {"code", "message"}}``, or the wire shape of the system a route
is compatible with, e.g. the agent runtime's diagnostic: see
``tests/api/error_shapes.py``), never a 5xx, and the account the session
belongs to must still work afterwards.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.accounts.helpers import Browser, signed_up_user
from tests.api.error_shapes import check_error
from tests.helpers.suite import Suite

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=4),
    max_leaves=10,
)
WRONG = {"string": st.integers() | st.booleans() | st.lists(st.integers(), max_size=2),
         "integer": st.text(max_size=5) | st.floats(allow_nan=False),
         "boolean": st.text(max_size=5) | st.integers(min_value=2)}

# Operations whose body is parsed before anything else and that must not
# change real state when given good-looking input by chance.
# DELETE /v1/me with a matching confirmation would delete the test account.
SKIP = {("DELETE", "/v1/me")}


Operation = tuple[str, str, str, dict[str, Any]]
"""(method, concrete path, documented path, request body schema)"""


def _operations(doc: dict[str, Any]) -> list[Operation]:
    ops = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body and (method.upper(), path) not in SKIP:
                # Path parameters get an id that exists nowhere.
                concrete = re.sub(r"\{[^}]+\}", "nonexistent0", path)
                ops.append((method.upper(), concrete, path, _deref(doc, body["schema"])))
    return sorted(ops)


def _deref(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def _mutations(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    props: dict[str, Any] = schema.get("properties", {})
    required = schema.get("required", [])
    valid_ish = {name: "x" * 10 if p.get("type") == "string" else 1 for name, p in props.items()}
    strategies: list[st.SearchStrategy[Any]] = [JSON]
    if required:
        strategies.append(st.sampled_from(required).map(
            lambda drop: {k: v for k, v in valid_ish.items() if k != drop}))
    typed = [(name, WRONG[p["type"]]) for name, p in props.items() if p.get("type") in WRONG]
    if typed:
        strategies.append(st.sampled_from(typed).flatmap(
            lambda nt: nt[1].map(lambda bad: {**valid_ish, nt[0]: bad})))
    strategies.append(st.text(min_size=1, max_size=10).filter(lambda k: k not in props).map(
        lambda extra: {**valid_ish, extra: "surprise"}))
    return st.one_of(strategies)


@pytest.fixture(scope="module")
def doc(api_suite: Suite) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(api_suite.url + "/openapi.json").json()
    return document


@pytest.fixture(scope="module")
def operations(doc: dict[str, Any]) -> list[Operation]:
    ops = _operations(doc)
    assert len(ops) >= 8, ops
    return ops


@pytest.fixture(scope="module")
def browser(api_suite: Suite) -> Browser:
    return signed_up_user(api_suite, "Fuzz")[0]


def _assert_documented_4xx(doc: dict[str, Any], method: str, documented: str,
                           response: httpx.Response, sent: Any) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, sent, response.text)
    check_error(doc, method, documented, response.status_code, response.content)


def test_generated_bad_bodies_never_cause_a_server_error(
        api_suite: Suite, doc: dict[str, Any], operations: list[Operation], browser: Browser) -> None:
    for method, path, documented, schema in operations:
        _fuzz_operation(api_suite, doc, browser, method, path, documented, schema)
    assert browser.get("/v1/me").status_code == 200


def _fuzz_operation(api_suite: Suite, doc: dict[str, Any], browser: Browser, method: str, path: str,
                    documented: str, schema: dict[str, Any]) -> None:
    # One keep-alive client for the anonymous requests too (as the browser's),
    # rather than a new connection per example.
    with httpx.Client(base_url=api_suite.url, timeout=30) as anonymous:

        @settings(max_examples=15, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(body=_mutations(schema), authenticated=st.booleans())
        def check(body: Any, authenticated: bool) -> None:
            content = json.dumps(body).encode()
            if authenticated:
                response = browser.send(method, path, None, content=content,
                                        headers={"Content-Type": "application/json"})
            else:
                response = anonymous.request(method, path, content=content,
                                             headers={"Content-Type": "application/json"})
            if response.status_code < 300:  # generated input that happens to be valid
                return
            _assert_documented_4xx(doc, method, documented, response, body)

        check()


def test_broken_json_and_oversized_bodies_are_4xx(api_suite: Suite, doc: dict[str, Any]) -> None:
    anon = httpx.Client(base_url=api_suite.url, timeout=60)
    for raw in (b"{", b"[1,", b"\xff\xfe", b"null", b'"string"', b"1e999999"):
        response = anon.post("/v1/auth/login", content=raw, headers={"Content-Type": "application/json"})
        _assert_documented_4xx(doc, "POST", "/v1/auth/login", response, raw)
    huge = b'{"email": "' + b"a" * (17 * 1024 * 1024) + b'"}'
    response = anon.post("/v1/auth/signup", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
