"""codex-oauth sign-in against a local OAuth issuer, and memory given to the planner, over real HTTP.

The test starts two small servers: an OAuth issuer (authorization endpoint
that consents at once and redirects with a code; token endpoint that checks
the PKCE verifier against the challenge and refreshes) and an
OpenAI-compatible model double that records each request and answers with
tool calls (``write_file`` of the note, then ``done``). ``dovecote up`` runs
on the xvfb provider. A planner run with ``authProvider: "codex-oauth"``
sends the refreshed access token as its bearer, and its system prompt holds
the team's global memory and the scenario app's memory (not another app's);
their access counts go up.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.helpers.suite import Suite
from tests.helpers.tables import tables_holding
from tests.runs.helpers import TOOLS, Api, api_client

pytestmark = pytest.mark.slow

CLIENT_ID = "dovecote-test"
NOTE = "remembered note"


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class Issuer(BaseHTTPRequestHandler):
    codes: dict[str, dict[str, str]] = {}
    refresh: dict[str, str] = {}
    grants: list[dict[str, str]] = []
    issued: list[str] = []

    def log_message(self, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != "/oauth/authorize" or q.get("response_type") != "code" or q.get(
                "client_id") != CLIENT_ID or q.get("code_challenge_method") != "S256":
            self._json(400, {"error": "invalid_request"})
            return
        code = secrets.token_hex(8)
        Issuer.codes[code] = {"challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"]}
        self.send_response(302)
        self.send_header("Location", q["redirect_uri"] + "?" + urlencode({"code": code, "state": q["state"]}))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"])).decode()
        form = {k: v[0] for k, v in parse_qs(raw).items()}
        Issuer.grants.append(form)
        if form.get("client_id") != CLIENT_ID:
            self._json(401, {"error": "invalid_client"})
            return
        if form.get("grant_type") == "authorization_code":
            pending = Issuer.codes.pop(form.get("code", ""), None)
            challenge = s256(form.get("code_verifier", ""))
            if (pending is None or pending["challenge"] != challenge
                    or pending["redirect_uri"] != form.get("redirect_uri")):
                self._json(400, {"error": "invalid_grant"})
                return
            expires_in = 5  # inside the refresh margin: the first use refreshes it
        elif form.get("grant_type") == "refresh_token":
            if form.get("refresh_token") not in Issuer.refresh:
                self._json(400, {"error": "invalid_grant"})
                return
            Issuer.refresh.pop(form["refresh_token"])
            expires_in = 3600
        else:
            self._json(400, {"error": "unsupported_grant_type"})
            return
        access, refresh = "acc-" + secrets.token_hex(12), "ref-" + secrets.token_hex(12)
        Issuer.refresh[refresh] = access
        Issuer.issued += [access, refresh]
        self._json(200, {"access_token": access, "refresh_token": refresh, "expires_in": expires_in,
                         "token_type": "Bearer"})

    def _json(self, status: int, payload: Any) -> None:
        send_json(self, status, payload)


class Model(BaseHTTPRequestHandler):
    calls: list[tuple[str, dict[str, Any]]] = []

    def log_message(self, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        send_json(self, 200, {"data": [{"id": "fake-model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Model.calls.append((self.headers.get("Authorization", ""), body))
        if not any(m["role"] == "tool" for m in body["messages"]):
            arguments = json.dumps({"path": "Documents/note.txt", "contents": NOTE})
            calls = [{"id": "w1", "type": "function",
                      "function": {"name": "write_file", "arguments": arguments}}]
        else:
            calls = [{"id": "d1", "type": "function", "function": {
                "name": "done", "arguments": json.dumps({"summary": "wrote the note"})}}]
        send_json(self, 200, {"choices": [{"message": {
            "role": "assistant", "content": None, "tool_calls": calls}}], "usage": {"total_tokens": 7}})


class World:
    suite: Suite
    ana: Api
    bob: Api
    issuer: str
    database: str


@pytest.fixture(scope="module")
def database(postgres_url: str) -> Iterator[str]:
    name = "codex_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(postgres_url, dbname=name)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def world(database: str) -> Iterator[World]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"infra/system-deps.sh did not install {missing}")
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for handler in (Issuer, Model)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    issuer, model = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    root = Path(tempfile.mkdtemp(prefix="dccodex-", dir="/var/tmp"))
    root.chmod(0o755)
    w = World()
    w.issuer = issuer
    w.database = database
    w.suite = Suite(extra_env={"DATABASE_URL": database,
        "DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_DESKTOP_XVFB": "true",
        "DOVECOTE_DESKTOP_XVFB_ROOT": str(root / "runtime"), "DOVECOTE_RUNS_DESKTOP_PROVIDER": "xvfb",
        "DOVECOTE_RUNS_READY_TIMEOUT_S": "60",
        "DOVECOTE_MODEL_BASE_URL": model + "/v1", "DOVECOTE_MODEL": "fake-model",
        "DOVECOTE_CODEX_ISSUER": issuer, "DOVECOTE_CODEX_CLIENT_ID": CLIENT_ID})
    try:
        w.suite.wait_ready()
        w.ana, w.bob = api_client(w.suite, "Ana"), api_client(w.suite, "Bob")
        yield w
    finally:
        w.suite.stop()
        for server in servers:
            server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def codex_status(api: Api) -> dict[str, Any]:
    response = api.get("/api/auth/status")
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()["providers"]["codex-oauth"]
    return status


def sign_in(world: World, api: Api) -> dict[str, Any]:
    started = api.post("/api/auth/codex/login")
    assert started.status_code == 200, started.text
    login = started.json()
    url = urlparse(login["url"])
    assert login["url"].startswith(world.issuer + "/oauth/authorize?")
    query = parse_qs(url.query)
    assert query["code_challenge_method"] == ["S256"] and query["state"] == [login["state"]]
    assert query["redirect_uri"] == [world.suite.url + "/api/auth/codex/callback"] == [login["redirectUri"]]
    consent = httpx.get(login["url"], follow_redirects=False, timeout=10)  # the user consents
    assert consent.status_code == 302
    callback = httpx.get(consent.headers["Location"], timeout=30)  # the browser comes back
    assert callback.status_code == 200, callback.text
    assert callback.json()["signedIn"] is True
    return login


def test_codex_oauth_signs_in_refreshes_and_feeds_the_planner_with_memory(world: World) -> None:
    health = world.ana.get("/api/system/health").json()
    assert health["proxy"] == {"configured": True, "model": "fake-model", "status": "ok"}, health
    assert health["auth"]["codex-oauth"]["configured"] is True
    assert health["auth"]["codex-oauth"]["issuer"] == world.issuer
    before = codex_status(world.ana)
    assert before["configured"] is True and before["signedIn"] is False
    refused = world.ana.post("/api/runs", {"scenarioId": "note-editor", "agentType": "planner",
                                           "authProvider": "codex-oauth", "input": {"text": NOTE}})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "codex_not_signed_in", refused.text

    login = sign_in(world, world.ana)
    again = httpx.get(world.suite.url + "/api/auth/codex/callback",
                      params={"state": login["state"], "code": "x"}, timeout=10)
    assert again.status_code == 400 and again.json() == {"error": "Unknown or expired sign-in state."}
    unknown = httpx.get(world.suite.url + "/api/auth/codex/callback", params={"state": "nope"}, timeout=10)
    assert unknown.status_code == 400
    for token in Issuer.issued:  # sealed at rest: no table holds a token in clear
        assert tables_holding(world.database, token) == [], token
    status = codex_status(world.ana)
    assert status["signedIn"] is True and status["canRefresh"] is True and status["expiresAt"]
    assert codex_status(world.bob)["signedIn"] is False  # per team
    text = json.dumps(world.ana.get("/api/auth/status").json())
    assert not any(token in text for token in Issuer.issued)

    memories = {}
    for body in ({"content": "The user keeps notes under Documents.", "appContext": "mousepad",
                  "category": "preference", "tags": ["notes"], "confidence": 0.9},
                 {"content": "The user writes in plain English.", "category": "style"},
                 {"content": "Chrome should use dark mode.", "appContext": "Chrome"}):
        created = world.ana.post("/api/memory", body)
        assert created.status_code == 201, created.text
        memories[body["content"]] = created.json()
    world.bob.post("/api/memory", {"content": "Bob's secret habit."})

    Model.calls.clear()
    created = world.ana.post("/api/runs", {"scenarioId": "note-editor", "agentType": "planner",
                                           "authProvider": "codex-oauth", "input": {"text": NOTE}})
    assert created.status_code == 202, created.text
    events = world.ana.events(created.json()["id"])
    final = next(e for e in events if e["type"] == "final")
    assert final["payload"]["status"] == "Succeeded", [(e["type"], e["message"]) for e in events]
    steps = [e["type"] for e in events if e["type"] in ("tool_call", "computer_action", "tool_result")]
    # stored in order (then the verifier's own read_file)
    assert steps == ["tool_call", "computer_action", "tool_result", "computer_action", "tool_result"], steps

    assert len(Model.calls) == 2
    grants = [g["grant_type"] for g in Issuer.grants if g.get("client_id") == CLIENT_ID]
    assert grants == ["authorization_code", "refresh_token"], grants
    refreshed = Issuer.issued[2]  # the access token of the refresh
    assert all(auth == f"Bearer {refreshed}" for auth, _ in Model.calls), [a for a, _ in Model.calls]
    system = Model.calls[0][1]["messages"][0]
    assert system["role"] == "system"
    assert "The user keeps notes under Documents." in system["content"]
    assert "The user writes in plain English." in system["content"]
    assert "Chrome should use dark mode." not in system["content"]
    assert "Bob's secret habit." not in system["content"]
    by_content = {e["content"]: e for e in world.ana.get("/api/memory/global").json()}
    assert by_content["The user writes in plain English."]["accessCount"] == 1
    app = world.ana.get("/api/memory/apps/mousepad").json()["entries"][0]
    assert app["accessCount"] == 1 and app["lastAccessedAt"]
    chrome = world.ana.get("/api/memory/apps/Chrome").json()["entries"][0]
    assert chrome["accessCount"] == 0

    for token in Issuer.issued:  # the refreshed tokens too
        assert tables_holding(world.database, token) == [], token
    logout = world.ana.post("/api/auth/codex/logout")
    assert logout.status_code == 200 and logout.json()["providers"]["codex-oauth"]["signedIn"] is False
    assert codex_status(world.ana)["signedIn"] is False
    output = "\n".join(world.suite.output)
    assert not any(token in output for token in Issuer.issued)  # tokens never logged
    logs = "".join(p.read_text() for p in (world.suite.data_dir / "logs").glob("*.log*"))
    assert "codex-oauth signed in" in logs and not any(token in logs for token in Issuer.issued)
