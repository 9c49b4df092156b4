"""The whole API under schemathesis, against a real running suite.

``st run`` (schemathesis' CLI, in a subprocess) goes over every operation of
the gateway's own ``/openapi.json`` twice — once with an API key, once with
a signed-in session (cookie + ``X-CSRF-Token``), and then the agent
runtime's ``/api/agent/*`` once more with an agent session's identity
headers and bearer token (with the others they only answer 401) — through its coverage,
fuzzing and stateful phases (links between operations are inferred from the
document), bounded in examples and time. It must find:

* no server error, and every error body in the shape its operation
  documents for that status — the platform's ``{"error": {"code",
  "message"}}``, the agent runtime's diagnostic, the desktop sessions
  reference's own (``documented_errors`` in ``schemathesis_checks.py``);
* every response conforming to its documented status, content type,
  headers and schema;
* no request without an answer within 30 s (``--request-timeout 30``: a
  timeout is a failed run);

and afterwards no gateway socket left in CLOSE-WAIT or LAST-ACK.

Capsule creates: the suite runs with the VM driver off, so a valid create
answers the documented 503 ``vm_driver_disabled`` (a 5xx the checks allow,
on the create operations only) and an impossible one a 4xx; for the same
reason a qemu desktop session create answers the documented 503
``desktop_template_unavailable`` (no desktop template without VMs) — booting
dozens of VMs under TCG would not fit the test budget, and what happens
inside capsules is the VM tests' business. Operations that would end the
credentials the run uses (logout, logout-all, deleting the account, its
sessions or the API key, changing the password, switching team — which
replaces the session: the stateful phase switched to a team it had just
created, and every later request of the session run was a 401) are left out: their bodies
are fuzzed by ``tests/accounts/test_bad_input.py``. The event streams never
end by design and are left out too (``tests/events``).

Checks left out, and why: ``positive_data_acceptance`` (schema-valid data
is refused for semantic reasons — an unknown token, a taken name),
``negative_data_rejection`` (advisory formats such as ``email``),
``allow_header_conformance`` (``/v1/capsules/stats`` and ``/v1/capsules/{id}``
overlap, so Allow names both), ``ignored_auth`` (the credentials are given as
raw headers, which schemathesis cannot take away).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.accounts.helpers import signed_up_user
from tests.helpers.sockets import wait_no_lingering_sockets
from tests.helpers.suite import Suite

REPO = Path(__file__).resolve().parents[2]
CHECKS = ("documented_errors,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance,unsupported_method,"
          "missing_required_header,use_after_free,ensure_resource_availability")
EXCLUDED_OPERATIONS = ["logout", "logout_all", "delete_me", "revoke_session", "change_password",
                       "delete_api_key", "switch_team"]
MAX_TIME_S = int(os.environ.get("DOVECOTE_FUZZ_MAX_TIME_S", "90"))
EXAMPLES = os.environ.get("DOVECOTE_FUZZ_EXAMPLES", "3")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_suite() -> Iterator[Suite]:
    """A suite of its own: the fuzz creates teams, hosts and channels by the hundred."""
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000",
                             "DOVECOTE_SSE_KEEPALIVE_S": "2"})
    try:
        suite.wait_ready()
        # The first account is the platform admin: an operator, not the fuzz's user,
        # so the admin routes are fuzzed at their boundary without deleting the run's team.
        signed_up_user(suite, "Operator")
        yield suite
    finally:
        suite.stop()


def _st_run(suite: Suite, headers: list[str], seed: int,
            extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "run", suite.url + "/openapi.json", "--checks", CHECKS,
           "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", EXAMPLES,
           "--max-time", str(MAX_TIME_S), "--request-timeout", "30", "--workers", "1",
           "--seed", str(seed), "--no-color", "--exclude-path-regex", "/events/stream$"]
    for op in EXCLUDED_OPERATIONS:
        cmd += ["--exclude-operation-id", op]
    for header in headers:
        cmd += ["-H", header]
    cmd += extra
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_checks",
           "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=MAX_TIME_S * 3 + 240)


def _assert_clean(result: subprocess.CompletedProcess[str], who: str) -> None:
    out = result.stdout + result.stderr
    summary = out[out.rfind("= SUMMARY ="):] if "= SUMMARY =" in out else out[-4000:]
    assert "Network Error" not in out, f"{who}: requests without an answer:\n{out[-8000:]}"
    assert result.returncode == 0, f"{who}: schemathesis found failures:\n{out[-12000:]}\n{summary}"
    assert "Selected: " in summary, summary


@pytest.fixture(scope="module")
def accounts(fuzz_suite: Suite) -> dict[str, str]:
    browser, _, _ = signed_up_user(fuzz_suite, "Fuzz")
    key = browser.post("/v1/api-keys", {"name": "schemathesis"}).json()["key"]
    return {"key": key, "sid": browser.http.cookies["wrenn_sid"],
            "csrf": browser.http.cookies["wrenn_csrf"]}


def test_the_api_under_schemathesis_with_an_api_key(fuzz_suite: Suite,
                                                    accounts: dict[str, str]) -> None:
    result = _st_run(fuzz_suite, [f"X-API-Key: {accounts['key']}"], seed=1)
    _assert_clean(result, "API key")


def test_the_api_under_schemathesis_with_a_session(fuzz_suite: Suite,
                                                   accounts: dict[str, str]) -> None:
    result = _st_run(fuzz_suite, [f"Cookie: wrenn_sid={accounts['sid']}; wrenn_csrf={accounts['csrf']}",
                                  f"X-CSRF-Token: {accounts['csrf']}"], seed=2)
    _assert_clean(result, "session")


def test_the_agent_runtime_under_schemathesis_with_an_agent_identity(
        fuzz_suite: Suite, accounts: dict[str, str]) -> None:
    """``/api/agent/*`` past its identity check (the runs above only reach its 401s)."""
    import httpx

    with httpx.Client(base_url=fuzz_suite.url, headers={"X-API-Key": accounts["key"]},
                      timeout=30) as operator:
        workspace = operator.post("/v1/agent/workspaces", json={"name": "fuzz"}).json()["workspace"]["id"]
        created = operator.post("/v1/agent/sessions",
                                json={"workspace_id": workspace, "agent_name": "fuzzer"}).json()
        task = operator.post("/v1/agent/tasks", json={"workspace_id": workspace, "title": "fuzz"})
        assert task.status_code == 201, task.text
        run = operator.post(f"/v1/agent/tasks/{task.json()['task']['id']}/runs")
        assert run.status_code == 201, run.text
    result = _st_run(fuzz_suite, [f"X-AGH-Session-ID: {created['session']['id']}", "X-AGH-Agent: fuzzer",
                                  f"Authorization: Bearer {created['token']}"], seed=3,
                     extra=("--include-path-regex", "^/api/agent/"))
    _assert_clean(result, "agent identity")


def test_no_socket_lingers_after_the_fuzz(fuzz_suite: Suite) -> None:
    left = trio.run(wait_no_lingering_sockets, fuzz_suite.port, 40.0)
    assert not left, f"{len(left)} gateway sockets in CLOSE-WAIT/LAST-ACK after the fuzz: {left[:10]}"


def test_an_impossible_capsule_is_a_4xx_naming_the_limit(fuzz_suite: Suite,
                                                         accounts: dict[str, str]) -> None:
    import httpx

    response = httpx.post(fuzz_suite.url + "/v1/capsules", json={"memory_mb": 4194303},
                          headers={"X-API-Key": accounts["key"]}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "memory_mb" in error["message"]
    assert "16384" in error["message"]  # the configured per-capsule limit
