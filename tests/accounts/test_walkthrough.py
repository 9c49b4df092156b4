"""The accounts plane end to end, as one user and a colleague would walk it.

signup → activation from the outbox → login → CSRF-protected calls (and one
refused without the header) → API key creation → the key used with
X-API-Key → a team with a second member and role changes → an audit entry
for each step → logout-all ending every session at once.
"""

from __future__ import annotations

import httpx

from tests.accounts.helpers import Browser, outbox_token, signed_up_user, unique_email
from tests.helpers.suite import Suite


def test_the_accounts_walkthrough(api_suite: Suite) -> None:
    # Sign up and activate from the outbox; then log in on a second device.
    owner = Browser(api_suite)
    email, password = unique_email("owner"), "walkthrough-pass"
    assert owner.post("/v1/auth/signup", {"email": email, "password": password,
                                          "name": "Olga"}).status_code == 201
    activated = owner.post("/v1/auth/activate", {"token": outbox_token(api_suite, email)})
    assert activated.status_code == 200
    home = activated.json()["team_id"]
    laptop = Browser(api_suite)
    assert laptop.post("/v1/auth/login", {"email": email, "password": password}).status_code == 200

    # CSRF: refused without the header, accepted with it.
    assert owner.send("POST", "/v1/teams", {"name": "Lab"}, csrf=False).status_code == 403
    created = owner.post("/v1/teams", {"name": "Lab"})
    assert created.status_code == 201, created.text
    lab = created.json()["id"]
    assert owner.post("/v1/auth/switch-team", {"team_id": lab}).status_code == 200

    # An API key for the team, shown once, recognised at the edge.
    key_reply = owner.post("/v1/api-keys", {"name": "deploy"})
    assert key_reply.status_code == 201
    key = key_reply.json()["key"]
    with_key = httpx.get(api_suite.url + "/v1/teams", headers={"X-API-Key": key})
    assert with_key.status_code == 403  # a valid key, on a session-only route
    assert with_key.json()["error"]["code"] == "session_required"
    forged = httpx.get(api_suite.url + "/v1/teams", headers={"X-API-Key": "wrn_" + "0" * 48})
    assert forged.status_code == 401
    listed = owner.get("/v1/api-keys").json()
    assert [k["name"] for k in listed] == ["deploy"] and all("key" not in k or k["key"] is None
                                                              for k in listed)

    # A colleague joins; her role changes.
    colleague, colleague_email, _ = signed_up_user(api_suite, "Cleo")
    added = owner.post(f"/v1/teams/{lab}/members", {"email": colleague_email})
    assert added.status_code == 201, added.text
    colleague_id = next(m["user_id"] for m in owner.get(f"/v1/teams/{lab}/members").json()
                        if m["email"] == colleague_email)
    assert owner.send("PATCH", f"/v1/teams/{lab}/members/{colleague_id}",
                      {"role": "admin"}).status_code == 204
    assert owner.send("PATCH", f"/v1/teams/{lab}/members/{colleague_id}",
                      {"role": "member"}).status_code == 204
    roles = {m["email"]: m["role"] for m in owner.get(f"/v1/teams/{lab}/members").json()}
    assert roles == {email: "owner", colleague_email: "member"}
    assert colleague.post("/v1/auth/switch-team", {"team_id": lab}).status_code == 200

    # Every step is in the team's audit log, newest first.
    entries = owner.get("/v1/audit-logs", params={"limit": 200}).json()["entries"]
    steps = [(e["resource_type"], e["action"]) for e in entries]
    for step in [("team", "create"), ("api_key", "create"), ("member", "add"),
                 ("member", "update_role")]:
        assert step in steps, (step, steps)
    assert steps.count(("member", "update_role")) == 2
    assert all(e["status"] == "success" for e in entries)
    assert home != lab

    # logout-all ends both of the owner's sessions at once, not the colleague's.
    assert owner.post("/v1/auth/logout-all").status_code == 204
    assert owner.get("/v1/me").status_code == 401
    assert laptop.get("/v1/me").status_code == 401
    assert colleague.get("/v1/me").status_code == 200
