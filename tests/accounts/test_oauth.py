"""Sign-in with GitHub, linking and unlinking, end to end against a local provider.

The suite is configured (``DOVECOTE_GITHUB_*``) to use a small OAuth2 server
of our own on 127.0.0.1 that speaks GitHub's four endpoints: the authorize
page redirects straight back with a code, the token endpoint trades it for an
access token (or fails on demand), and ``/user`` and ``/user/emails`` describe
whoever the test said is "signed in to GitHub". Each flow is followed one
redirect at a time, the way a browser would, so every hop can be checked.
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import mock

import httpx
import pytest

from tests.accounts.helpers import Browser, signed_up_user, unique_email
from tests.helpers import suite as suite_module
from tests.helpers.suite import Suite

CLIENT_ID = "Iv1.dovecote-test"
CLIENT_SECRET = "client-secret-" + secrets.token_hex(12)
SPA = "http://spa.example.test"
CALLBACK = f"{SPA}/auth/github/callback"


# -- a local GitHub ---------------------------------------------------------------


@dataclass
class GitHubUser:
    id: int
    login: str
    name: str
    emails: list[dict[str, Any]]

    @property
    def email(self) -> str:
        return str(next(e["email"] for e in self.emails if e["primary"]))


@dataclass
class FakeGitHub:
    """What the local provider knows, and what it was asked."""

    url: str = ""
    signed_in: GitHubUser | None = None  # who approves the next authorization
    token_status: int = 200
    codes: dict[str, tuple[GitHubUser, str]] = field(default_factory=dict)
    tokens: dict[str, GitHubUser] = field(default_factory=dict)
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    secrets_seen: list[str] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(5_000_000))

    def new_user(self, name: str = "Octo Cat", email: str | None = None) -> GitHubUser:
        uid = next(self._ids)
        return GitHubUser(id=uid, login=f"octo{uid}", name=name, emails=[
            {"email": f"noreply-{uid}@users.noreply.github.test", "primary": False, "verified": True},
            {"email": email or unique_email("gh"), "primary": True, "verified": True},
        ])


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        fake = self.server.fake
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/login/oauth/authorize":
            back = query["redirect_uri"]
            if query.get("client_id") != CLIENT_ID or fake.signed_in is None:
                reply = {"error": "access_denied", "state": query.get("state", "")}
            else:
                code = secrets.token_hex(10)
                fake.codes[code] = (fake.signed_in, back)
                fake.secrets_seen.append(code)
                reply = {"code": code, "state": query.get("state", "")}
            self._send(302, headers={"Location": f"{back}?{urllib.parse.urlencode(reply)}"})
            return
        auth = self.headers.get("Authorization", "")
        user = fake.tokens.get(auth.removeprefix("Bearer "))
        if user is None:
            self._send(401, {"message": "Bad credentials"})
        elif url.path == "/user":
            self._send(200, {"id": user.id, "login": user.login, "name": user.name,
                             "email": None})
        elif url.path == "/user/emails":
            self._send(200, user.emails)
        else:
            self._send(404, {"message": "Not Found"})

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length", "0"))
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        fake.token_requests.append({"form": form, "accept": self.headers.get("Accept", "")})
        if self.path != "/login/oauth/access_token":
            self._send(404, {"message": "Not Found"})
            return
        if fake.token_status != 200:
            self._send(fake.token_status, {"message": "boom"})
            return
        grant = fake.codes.pop(form.get("code", ""), None)
        if (grant is None or form.get("client_id") != CLIENT_ID
                or form.get("client_secret") != CLIENT_SECRET or form.get("redirect_uri") != grant[1]):
            # GitHub's way: 200 with an error body.
            self._send(200, {"error": "bad_verification_code"})
            return
        token = "gho_" + secrets.token_hex(16)
        fake.tokens[token] = grant[0]
        fake.secrets_seen.append(token)
        self._send(200, {"access_token": token, "token_type": "bearer", "scope": "read:user,user:email"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeGitHub


@pytest.fixture(scope="module")
def github() -> Iterator[FakeGitHub]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = FakeGitHub(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def suite(github: FakeGitHub) -> Iterator[Suite]:
    """``dovecote up`` with GitHub pointed at the local provider."""
    port = suite_module.free_port()
    env = {
        "DOVECOTE_GITHUB_CLIENT_ID": CLIENT_ID,
        "DOVECOTE_GITHUB_CLIENT_SECRET": CLIENT_SECRET,
        "DOVECOTE_GITHUB_AUTHORIZE_URL": f"{github.url}/login/oauth/authorize",
        "DOVECOTE_GITHUB_TOKEN_URL": f"{github.url}/login/oauth/access_token",
        "DOVECOTE_GITHUB_API_URL": github.url,
        "DOVECOTE_OAUTH_REDIRECT_URL": SPA,
        "DOVECOTE_PUBLIC_URL": f"http://127.0.0.1:{port}",
    }
    # The public URL names the suite's own port, which Suite picks itself.
    with mock.patch.object(suite_module, "free_port", return_value=port):
        running = Suite(extra_env=env)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


# -- helpers ----------------------------------------------------------------------------


def cookie_header(response: httpx.Response, name: str) -> str:
    return next(c for c in response.headers.get_list("set-cookie") if c.startswith(f"{name}="))


def begin(browser: Browser, path: str = "/auth/oauth/github") -> httpx.Response:
    """The first hop: our redirect (or connect answer) towards the provider."""
    response = browser.get(path)
    assert response.status_code in (200, 302), response.text
    return response


def authorize(browser: Browser, auth_url: str) -> str:
    """The provider's hop: returns the callback URL it redirects to."""
    response = browser.http.get(auth_url)
    assert response.status_code == 302
    return response.headers["location"]


def github_sign_in(browser: Browser, github: FakeGitHub, user: GitHubUser | None) -> httpx.Response:
    """The whole sign-in, hop by hop; returns the callback's answer."""
    github.signed_in = user
    start = begin(browser)
    assert start.status_code == 302
    callback = authorize(browser, start.headers["location"])
    return browser.http.get(callback)


def landed(response: httpx.Response, error: str | None = None) -> None:
    """The callback sent the browser to the SPA, with ``error`` or none."""
    assert response.status_code == 302, response.text
    expected = CALLBACK if error is None else f"{CALLBACK}?error={error}"
    assert response.headers["location"] == expected
    session_set = any(c.startswith("wrenn_sid=") and not c.startswith("wrenn_sid=;")
                      and 'wrenn_sid=""' not in c
                      for c in response.headers.get_list("set-cookie"))
    assert session_set == (error is None)


def state_of(callback_url: str) -> str:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback_url).query))["state"]


# -- tests ------------------------------------------------------------------------------


def test_start_redirects_to_the_provider_with_a_lax_state_cookie(suite: Suite,
                                                                  github: FakeGitHub) -> None:
    browser = Browser(suite)
    start = begin(browser)
    assert start.status_code == 302
    url = urllib.parse.urlsplit(start.headers["location"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{github.url}/login/oauth/authorize"
    query = dict(urllib.parse.parse_qsl(url.query))
    assert query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == f"{suite.url}/auth/oauth/github/callback"
    assert "user:email" in query["scope"]
    cookie = cookie_header(start, "wrenn_oauth_state")
    assert f"wrenn_oauth_state={query['state']}" in cookie
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/auth/oauth/" in cookie
    assert "Max-Age=600" in cookie


def test_new_account_via_github_then_a_repeat_login(suite: Suite, github: FakeGitHub) -> None:
    user = github.new_user("Mona Lisa")
    first = Browser(suite)
    response = github_sign_in(first, github, user)
    landed(response)
    sid = cookie_header(response, "wrenn_sid")
    assert "HttpOnly" in sid and "SameSite=Strict" in sid
    assert cookie_header(response, "wrenn_oauth_state").startswith(('wrenn_oauth_state=""',
                                                                    "wrenn_oauth_state=;"))
    # The code was exchanged as GitHub expects: form POST, JSON answer, our secret.
    exchange = github.token_requests[-1]
    assert exchange["accept"] == "application/json"
    assert exchange["form"]["client_secret"] == CLIENT_SECRET
    assert exchange["form"]["redirect_uri"] == f"{suite.url}/auth/oauth/github/callback"

    me = first.get("/v1/me")
    assert me.status_code == 200
    # The verified primary address, not the noreply one; no password.
    assert me.json() == {"name": "Mona Lisa", "email": user.email, "has_password": False,
                         "providers": ["github"]}
    # The new account works like any other: a CSRF-checked change.
    assert first.send("PATCH", "/v1/me", {"name": "Mona"}).status_code == 204

    second = Browser(suite)
    landed(github_sign_in(second, github, user))
    assert second.get("/v1/me").json()["email"] == user.email
    assert len(first.get("/v1/me/sessions").json()["sessions"]) == 2


def test_an_address_of_a_password_account_is_email_taken(suite: Suite, github: FakeGitHub) -> None:
    _, email, _ = signed_up_user(suite, "Taken")
    browser = Browser(suite)
    landed(github_sign_in(browser, github, github.new_user(email=email)), "email_taken")
    assert browser.get("/v1/me").status_code == 401


def test_a_wrong_or_missing_state_is_invalid_state(suite: Suite, github: FakeGitHub) -> None:
    browser = Browser(suite)
    github.signed_in = github.new_user()
    callback = authorize(browser, begin(browser).headers["location"])
    forged = callback.replace(f"state={state_of(callback)}", "state=forged")
    landed(browser.http.get(forged), "invalid_state")
    # A callback without the state cookie (another browser) is refused too.
    landed(httpx.get(callback), "invalid_state")
    assert browser.get("/v1/me").status_code == 401


def test_a_callback_without_code_is_missing_code(suite: Suite, github: FakeGitHub) -> None:
    browser = Browser(suite)
    github.signed_in = github.new_user()
    callback = authorize(browser, begin(browser).headers["location"])
    state = state_of(callback)
    landed(browser.http.get("/auth/oauth/github/callback", params={"state": state}), "missing_code")


def test_a_refusal_at_the_provider_is_access_denied(suite: Suite, github: FakeGitHub) -> None:
    browser = Browser(suite)
    landed(github_sign_in(browser, github, None), "access_denied")


def test_a_failing_token_endpoint_is_exchange_failed(suite: Suite, github: FakeGitHub) -> None:
    browser = Browser(suite)
    github.token_status = 500
    try:
        landed(github_sign_in(browser, github, github.new_user()), "exchange_failed")
    finally:
        github.token_status = 200
    # A code the provider does not know (GitHub answers 200 with an error).
    github.signed_in = github.new_user()
    callback = authorize(browser, begin(browser).headers["location"])
    stale = callback.replace("code=", "code=0")
    landed(browser.http.get(stale), "exchange_failed")


def test_link_from_a_password_account_then_unlink(suite: Suite, github: FakeGitHub) -> None:
    browser, email, _ = signed_up_user(suite, "Linker")
    user = github.new_user("Linker On GitHub", email=email)
    # Before the link, the address belongs to the password account.
    landed(github_sign_in(Browser(suite), github, user), "email_taken")

    github.signed_in = user
    connect = begin(browser, "/v1/me/providers/github/connect")
    assert connect.status_code == 200
    assert set(connect.json()) == {"auth_url"}
    auth_url = connect.json()["auth_url"]
    assert auth_url.startswith(f"{github.url}/login/oauth/authorize?")
    link_cookie = cookie_header(connect, "wrenn_oauth_link")
    assert "HttpOnly" in link_cookie and "SameSite=Lax" in link_cookie
    callback = authorize(browser, auth_url)
    # The browser does not send the SameSite=Strict session cookie on the
    # provider's redirect back: only the two Lax flow cookies come along.
    flow_cookies = {name: browser.http.cookies.get(name) or ""
                    for name in ("wrenn_oauth_state", "wrenn_oauth_link")}
    response = httpx.get(callback, cookies=flow_cookies)
    assert response.status_code == 302 and response.headers["location"] == CALLBACK
    assert not any(c.startswith("wrenn_sid=") for c in response.headers.get_list("set-cookie"))
    assert browser.get("/v1/me").json()["providers"] == ["github"]

    # GitHub now signs in to the password account.
    other = Browser(suite)
    landed(github_sign_in(other, github, user))
    assert other.get("/v1/me").json()["email"] == email

    # The same GitHub account cannot be linked to a second account.
    second, _, _ = signed_up_user(suite, "Second")
    github.signed_in = user
    callback = authorize(second, begin(second, "/v1/me/providers/github/connect").json()["auth_url"])
    landed(second.http.get(callback), "email_taken")
    assert second.get("/v1/me").json()["providers"] == []

    # Unlink: the password remains, so it is allowed; then there is nothing to unlink.
    assert browser.send("DELETE", "/v1/me/providers/github").status_code == 204
    assert browser.get("/v1/me").json()["providers"] == []
    again = browser.send("DELETE", "/v1/me/providers/github")
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
    # GitHub no longer signs in to it.
    landed(github_sign_in(Browser(suite), github, user), "email_taken")


def test_a_forged_link_cookie_is_invalid_state(suite: Suite, github: FakeGitHub) -> None:
    browser, _, _ = signed_up_user(suite, "Forger")
    github.signed_in = github.new_user()
    connect = begin(browser, "/v1/me/providers/github/connect")
    callback = authorize(browser, connect.json()["auth_url"])
    token = browser.http.cookies.get("wrenn_oauth_link") or ""
    expires, user_id, session_id, mac = token.split(".")
    forged = f"{expires}.usr_0000000000000000.{session_id}.{mac}"
    response = httpx.get(callback, cookies={"wrenn_oauth_state": state_of(callback),
                                            "wrenn_oauth_link": forged})
    landed(response, "invalid_state")
    assert user_id and browser.get("/v1/me").json()["providers"] == []


def test_unlinking_the_only_login_method_is_refused(suite: Suite, github: FakeGitHub) -> None:
    browser = Browser(suite)
    landed(github_sign_in(browser, github, github.new_user()))
    refused = browser.send("DELETE", "/v1/me/providers/github")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "last_login_method"
    assert browser.get("/v1/me").json()["providers"] == ["github"]
    # CSRF applies as to any state change.
    assert browser.send("DELETE", "/v1/me/providers/github", csrf=False).status_code == 403


def test_unknown_or_unconfigured_providers_are_404(suite: Suite, api_suite: Suite) -> None:
    for path in ("/auth/oauth/gitlab", "/auth/oauth/gitlab/callback?code=x&state=y"):
        response = httpx.get(suite.url + path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    browser, _, _ = signed_up_user(suite, "Unknown")
    assert browser.get("/v1/me/providers/gitlab/connect").status_code == 404
    assert browser.send("DELETE", "/v1/me/providers/gitlab").status_code == 404
    # The shared suite has no GitHub settings: GitHub is not offered there.
    assert httpx.get(api_suite.url + "/auth/oauth/github").status_code == 404
    anon = httpx.get(api_suite.url + "/v1/me/providers/github/connect")
    assert anon.status_code == 401


def test_secrets_never_reach_the_logs(suite: Suite, github: FakeGitHub) -> None:
    landed(github_sign_in(Browser(suite), github, github.new_user()))
    logs = "".join(suite.output)
    assert "oauth" in logs or "service ready" in logs  # the logs are being read
    assert CLIENT_SECRET not in logs
    for value in github.secrets_seen:
        assert value not in logs


def test_the_routes_are_documented(suite: Suite) -> None:
    paths = httpx.get(suite.url + "/openapi.json").json()["paths"]
    assert set(paths["/auth/oauth/{provider}"]) == {"get"}
    assert set(paths["/auth/oauth/{provider}/callback"]) == {"get"}
    connect = paths["/v1/me/providers/{provider}/connect"]["get"]
    assert "auth_url" in json.dumps(connect["responses"]["200"]) or "ConnectProviderResponse" in \
        json.dumps(connect["responses"]["200"])
    assert set(paths["/v1/me/providers/{provider}"]) == {"delete"}
