"""The browser sessions API without a browser: validation, errors, isolation, failure reasons.

A suite with neither the host provider nor a model (the defaults): every bad
input is a 4xx in the platform's ``{"error": {"code", "message"}}`` shape
(hypothesis throws arbitrary bodies and queries at it: never a 500), unknown
and other teams' sessions are 404 on every route, a session that cannot
provision ends ``failed`` with its reason, and ``/openapi.json`` documents
every route.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.browsers.helpers import BASE, Api, api_client
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow

ROUTES = ("", "/actions", "/artifacts", "/health", "/console", "/network", "/json/version", "/json/list")


class World:
    suite: Suite
    ana: Api
    bob: Api


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    w.suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000"})
    try:
        w.suite.wait_ready()
        w.ana, w.bob = api_client(w.suite, "Ana"), api_client(w.suite, "Bob")
        yield w
    finally:
        w.suite.stop()


def assert_error(response: Any, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error


@pytest.mark.parametrize("body", [
    {"options": {"viewport": {"width": 0, "height": 600}}},
    {"options": {"viewport": {"width": 800, "height": 99999}}},
    {"options": {"viewport": {"width": "800", "height": 600}}},
    {"options": {"viewport": {"width": 800, "height": 600, "depth": 3}}},
    {"options": {"browser": "firefox"}},
    {"options": {"recording": "audio"}},
    {"initialPrompt": ""},
    {"initialPrompt": 42},
    {"initialPrompt": "x" * 10_001},
    [],
])
def test_bad_create_bodies_are_400(world: World, body: Any) -> None:
    assert_error(world.ana.post("/api/sessions", body), 400)


def test_bad_json_and_no_body_are_400(world: World) -> None:
    response = world.ana.http.post("/api/sessions", content=b"{nope",
                                   headers={"Content-Type": "application/json"})
    assert_error(response, 400)


@pytest.mark.parametrize("query", [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"offset": "-1"},
                                   {"includeTerminated": "maybe"}])
def test_bad_list_queries_are_400(world: World, query: dict[str, str]) -> None:
    assert_error(world.ana.get("/api/sessions", params=query), 400)


def test_limits_at_the_edges_are_accepted(world: World) -> None:
    for limit in ("1", "100"):
        response = world.ana.get("/api/sessions", params={"limit": limit, "includeTerminated": "true"})
        assert response.status_code == 200 and set(response.json()) == {"sessions", "total", "hasMore"}


def test_without_a_key_every_route_is_401(world: World) -> None:
    import httpx

    anon = httpx.Client(base_url=world.suite.url + "/browser", timeout=30)
    assert_error(anon.get("/api/sessions"), 401)
    assert_error(anon.post("/api/sessions", json={}), 401)
    assert_error(anon.get("/api/sessions/session-0000000000000000"), 401)
    assert_error(anon.get("/api/sessions/session-0000000000000000/json/version"), 401)
    bad = httpx.Client(base_url=world.suite.url + "/browser", timeout=30, headers={"x-api-key": "wrn_nope"})
    assert_error(bad.get("/api/sessions"), 401)


@pytest.mark.parametrize("session_id", ["session-0000000000000000", "nope", "x" * 65])
def test_unknown_sessions_are_404_on_every_route(world: World, session_id: str) -> None:
    for path in ROUTES:
        assert_error(world.ana.get(f"/api/sessions/{session_id}{path}"), 404, "session_not_found")
    assert_error(world.ana.delete(f"/api/sessions/{session_id}"), 404, "session_not_found")


def test_without_a_browser_provider_a_session_fails_with_its_reason(world: World) -> None:
    session_id = world.ana.create({"initialPrompt": "https://example.com/"})
    session = world.ana.wait_status(session_id, "failed", timeout=30)
    assert session["error"]["code"] == "vm_provider_unavailable"
    assert "DOVECOTE_BROWSER_HOST" in session["error"]["message"]
    assert [h["status"] for h in session["statusHistory"]] == ["creating", "failed"]
    assert session["endedAt"] and session["startedAt"] is None and session["connectUrl"] is None
    # Another team sees nothing of it, on any route.
    for path in ROUTES:
        assert_error(world.bob.get(f"/api/sessions/{session_id}{path}"), 404, "session_not_found")
    assert_error(world.bob.delete(f"/api/sessions/{session_id}"), 404, "session_not_found")
    assert world.bob.get("/api/sessions", params={"includeTerminated": "true"}).json()["total"] == 0
    # Terminated sessions are listed only on request.
    assert world.ana.get("/api/sessions").json() == {"sessions": [], "total": 0, "hasMore": False}
    listed = world.ana.get("/api/sessions", params={"includeTerminated": "true"}).json()
    assert session_id in [s["sessionId"] for s in listed["sessions"]]
    health = world.ana.get(f"/api/sessions/{session_id}/health").json()
    assert health == {"status": "unhealthy", "sessionState": "failed", "browserResponsive": False,
                      "currentUrl": None, "uptimeMs": 0}
    assert world.ana.get(f"/api/sessions/{session_id}/actions").json() == {"actions": [], "total": 0}
    assert_error(world.ana.get(f"/api/sessions/{session_id}/json/version"), 409, "session_not_running")


def test_a_task_prompt_without_a_model_fails_planner_unavailable(world: World) -> None:
    session_id = world.ana.create({"initialPrompt": "find the cheapest flight to Lisbon"})
    session = world.ana.wait_status(session_id, "failed", timeout=30)
    assert session["error"]["code"] == "planner_unavailable"
    assert "DOVECOTE_MODEL" in session["error"]["message"]


def test_openapi_documents_the_browser_routes(world: World) -> None:
    import httpx

    paths = httpx.get(world.suite.url + "/openapi.json", timeout=30).json()["paths"]
    for path, methods in ((BASE, {"get", "post"}), (BASE + "/{id}", {"get", "delete"}),
                          (BASE + "/{id}/actions", {"get"}), (BASE + "/{id}/artifacts", {"get"}),
                          (BASE + "/{id}/health", {"get"}), (BASE + "/{id}/console", {"get"}),
                          (BASE + "/{id}/network", {"get"}), (BASE + "/{id}/cdp", {"get"}),
                          (BASE + "/{id}/json/version", {"get"}), (BASE + "/{id}/json/list", {"get"})):
        assert methods <= set(paths[path]), (path, paths.get(path))


scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text())
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "initialPrompt": json_values,
        "options": st.fixed_dictionaries({}, optional={
            "browser": st.sampled_from(["chromium", "firefox", "", "webkit"]) | json_values,
            "viewport": st.fixed_dictionaries({}, optional={
                "width": st.integers(-10, 10_000) | json_values,
                "height": st.integers(-10, 10_000) | json_values}) | json_values,
            "recording": json_values})}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_any_create_body_is_never_a_500(world: World, body: Any) -> None:
    response = world.bob.post("/api/sessions", body)
    assert response.status_code in (200, 400, 429), response.text
    if response.status_code == 200:
        session_id = response.json()["sessionId"]
        world.bob.delete(f"/api/sessions/{session_id}")
    else:
        assert set(response.json()["error"]) >= {"code", "message"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(st.sampled_from(["limit", "offset", "includeTerminated", "other"]),
                             st.text(max_size=12), max_size=4),
       path=st.sampled_from(["/api/sessions", "/api/sessions/session-0000000000000000/actions"]))
def test_any_query_is_never_a_500(world: World, query: dict[str, str], path: str) -> None:
    response = world.bob.get(path, params=query)
    assert response.status_code in (200, 400, 404), response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) >= {"code", "message"}
