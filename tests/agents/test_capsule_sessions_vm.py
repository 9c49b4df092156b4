"""Capsule-bound agent sessions on a real VM: the capsule is the session's credential.

An operator creates an agent session with ``capsule_template``; code inside
that capsule (``curl`` in an exec) calls ``/api/agent/me`` at
``$AGH_AGENT_URL`` with no token and gets its own session; naming another
session from inside is refused; stopping the session destroys the capsule.
A child spawned with a ``sandbox_profiles`` entry naming a template gets a
capsule of its own, which ends when its parent is stopped.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.capsules import Api, running_capsule, wait_status


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    """A suite with VMs (its image and template warm: one running capsule) and a user's API key."""
    with running_capsule("dcagentcap-") as (_suite, client, _warm):
        yield client


def exec_in(api: Api, capsule_id: str, cmd: str) -> dict[str, Any]:
    response = api.http.post(f"/v1/capsules/{capsule_id}/exec", json={"cmd": cmd, "timeout_sec": 60},
                             timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_session_bound_to_a_capsule_calls_the_agent_api_from_inside_with_no_token(api: Api) -> None:
    ws = api.http.post("/v1/agent/workspaces", json={"name": "capsuled"})
    assert ws.status_code == 201, ws.text
    workspace_id = ws.json()["workspace"]["id"]
    created = api.http.post(
        "/v1/agent/sessions",
        json={"workspace_id": workspace_id, "agent_name": "inside", "capsule_template": "minimal"},
        timeout=400,
    )
    assert created.status_code == 201, created.text
    session = created.json()["session"]
    capsule_id = session["capsule_id"]
    assert capsule_id and capsule_id.startswith("cap-"), session
    assert wait_status(api, capsule_id, "running")["status"] == "running"

    env = exec_in(api, capsule_id, "env | grep ^AGH_ | sort")
    assert env["stdout"].splitlines() == [
        "AGH_AGENT=inside",
        "AGH_AGENT_URL=http://127.0.0.1:7070",
        f"AGH_SESSION_ID={session['id']}",
    ], env

    # No token, no identity headers: the capsule is the credential.
    me = exec_in(api, capsule_id, 'curl -s -w "\\n%{http_code}" "$AGH_AGENT_URL/api/agent/me"')
    body, _, status = me["stdout"].rpartition("\n")
    assert status == "200", me
    answered = json.loads(body)
    assert answered["me"]["session"]["id"] == session["id"], answered
    assert answered["me"]["session"]["agent_name"] == "inside", answered

    # The reference's headers, as the environment gives them, work the same way.
    headed = exec_in(api, capsule_id, 'curl -s -o /dev/null -w "%{http_code}" '
                     '-H "X-AGH-Session-ID: $AGH_SESSION_ID" -H "X-AGH-Agent: $AGH_AGENT" '
                     '"$AGH_AGENT_URL/api/agent/me"')
    assert headed["stdout"] == "200", headed

    # It cannot act as any other session, even one whose token it holds.
    other = api.http.post("/v1/agent/sessions", json={"workspace_id": workspace_id, "agent_name": "peer"})
    assert other.status_code == 201, other.text
    peer, token = other.json()["session"], other.json()["token"]
    posing = exec_in(api, capsule_id, 'curl -s -w "\\n%{http_code}" '
                     f"-H {shlex.quote('X-AGH-Session-ID: ' + peer['id'])} -H 'X-AGH-Agent: peer' "
                     f"-H {shlex.quote('Authorization: Bearer ' + token)} "
                     '"$AGH_AGENT_URL/api/agent/me"')
    refusal, _, status = posing["stdout"].rpartition("\n")
    assert status == "401", posing
    assert json.loads(refusal)["diagnostic"]["code"] == "identity_mismatch", posing

    # The session's capsule ends with the session.
    stopped = api.http.post(f"/v1/agent/sessions/{session['id']}/stop", json={}, timeout=120)
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["session"]["state"] == "stopped"
    ended = wait_status(api, capsule_id, "stopped", "missing", timeout=120)
    assert ended["status"] in ("stopped", "missing"), ended


def test_a_child_spawned_with_a_template_profile_gets_a_capsule_that_ends_with_its_parent(api: Api) -> None:
    ws = api.http.post("/v1/agent/workspaces", json={"name": "spawning"})
    assert ws.status_code == 201, ws.text
    created = api.http.post("/v1/agent/sessions", json={"workspace_id": ws.json()["workspace"]["id"],
                                                       "agent_name": "lead"})
    assert created.status_code == 201, created.text
    lead, token = created.json()["session"], created.json()["token"]
    spawned = api.http.post(
        "/api/agent/spawn",
        json={"agent_name": "helper", "permissions": {"sandbox_profiles": ["no-such-profile", "minimal"]}},
        headers={"X-AGH-Session-ID": lead["id"], "X-AGH-Agent": "lead", "Authorization": f"Bearer {token}"},
        timeout=400,
    )
    assert spawned.status_code == 201, spawned.text
    child = spawned.json()["spawn"]["session"]
    capsule_id = child["capsule_id"]
    assert capsule_id and capsule_id.startswith("cap-"), child
    assert wait_status(api, capsule_id, "running")["status"] == "running"
    me = exec_in(api, capsule_id, 'curl -s "$AGH_AGENT_URL/api/agent/me"')
    answered = json.loads(me["stdout"])
    assert answered["me"]["session"]["id"] == child["id"], answered
    assert answered["me"]["session"]["lineage"]["parent_session_id"] == lead["id"], answered

    stopped = api.http.post(f"/v1/agent/sessions/{lead['id']}/stop", json={}, timeout=120)
    assert stopped.status_code == 200, stopped.text
    children = stopped.json()["children"]
    assert [c["state"] for c in children] == ["stopped"], children
    assert wait_status(api, capsule_id, "stopped", "missing", timeout=120)["status"] in ("stopped", "missing")
