"""Sign-up, activation, login, CSRF and sessions over real HTTP against `dovecote up`."""

from __future__ import annotations

import httpx

from tests.accounts.helpers import Browser, outbox_token, signed_up_user, unique_email
from tests.helpers.suite import Suite


def test_signup_activation_login_and_csrf(api_suite: Suite) -> None:
    browser = Browser(api_suite)
    email, password = unique_email("walk"), "s3cret-password"
    signup = browser.post("/v1/auth/signup", {"email": email, "password": password, "name": "Walker"})
    assert signup.status_code == 201
    assert "message" in signup.json()

    # Inactive until activated.
    refused = browser.post("/v1/auth/login", {"email": email, "password": password})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_credentials"

    token = outbox_token(api_suite, email)
    activated = browser.post("/v1/auth/activate", {"token": token})
    assert activated.status_code == 200
    body = activated.json()
    assert body["email"] == email and body["role"] == "owner" and body["team_id"]
    assert set(body) == {"user_id", "team_id", "email", "name", "role", "is_admin"}
    sid_cookie = next(c for c in activated.headers.get_list("set-cookie") if c.startswith("wrenn_sid="))
    assert "HttpOnly" in sid_cookie and "SameSite=Strict" in sid_cookie

    # The token is single use.
    again = httpx.post(api_suite.url + "/v1/auth/activate", json={"token": token})
    assert again.status_code == 400
    assert again.json()["error"]["code"] == "invalid_token"

    me = browser.get("/v1/me")
    assert me.status_code == 200
    assert me.json() == {"name": "Walker", "email": email, "has_password": True, "providers": []}

    # A state-changing call with the cookie needs the CSRF header.
    no_csrf = browser.send("PATCH", "/v1/me", {"name": "W2"}, csrf=False)
    assert no_csrf.status_code == 403
    assert no_csrf.json()["error"]["code"] == "csrf_failed"
    wrong_csrf = browser.send("PATCH", "/v1/me", {"name": "W2"}, csrf=False,
                              headers={"X-CSRF-Token": "forged"})
    assert wrong_csrf.status_code == 403
    renamed = browser.send("PATCH", "/v1/me", {"name": "W2"})
    assert renamed.status_code == 204
    assert browser.get("/v1/me").json()["name"] == "W2"

    # A second login gives a second session; logout-all ends both at once.
    other = Browser(api_suite)
    login = other.post("/v1/auth/login", {"email": email, "password": password})
    assert login.status_code == 200
    sessions = browser.get("/v1/me/sessions").json()["sessions"]
    assert len(sessions) == 2 and sum(s["current"] for s in sessions) == 1
    assert browser.post("/v1/auth/logout-all").status_code == 204
    assert browser.get("/v1/me").status_code == 401
    assert other.get("/v1/me").status_code == 401


def test_login_with_a_wrong_password_is_401_and_rate_limited(api_suite: Suite) -> None:
    _, email, _ = signed_up_user(api_suite, "Limit")
    client = httpx.Client(base_url=api_suite.url)
    codes = [client.post("/v1/auth/login", json={"email": email, "password": "wrong-password"})
             for _ in range(11)]
    assert [c.status_code for c in codes[:10]] == [401] * 10
    assert codes[10].status_code == 429
    assert int(codes[10].headers["Retry-After"]) > 0
    assert codes[10].json()["error"]["code"] == "rate_limited"


def test_password_reset_is_silent_for_unknown_addresses_and_single_use(api_suite: Suite) -> None:
    browser, email, _ = signed_up_user(api_suite, "Reset")
    anon = httpx.Client(base_url=api_suite.url)
    assert anon.post("/v1/me/password/reset", json={"email": "nobody@example.com"}).status_code == 204
    assert anon.post("/v1/me/password/reset", json={"email": email}).status_code == 204
    token = outbox_token(api_suite, email, kind="Reset")
    done = anon.post("/v1/me/password/reset/confirm",
                     json={"token": token, "new_password": "another-password"})
    assert done.status_code == 204
    reused = anon.post("/v1/me/password/reset/confirm",
                       json={"token": token, "new_password": "third-password"})
    assert reused.status_code == 400
    # The reset revoked every session and the new password works.
    assert browser.get("/v1/me").status_code == 401
    assert anon.post("/v1/auth/login", json={"email": email, "password": "another-password"}
                     ).status_code == 200


def test_bad_bodies_get_the_documented_error_shape(api_suite: Suite) -> None:
    anon = httpx.Client(base_url=api_suite.url)
    cases = [
        anon.post("/v1/auth/signup", content=b"{not json", headers={"Content-Type": "application/json"}),
        anon.post("/v1/auth/signup", json={"email": "a@b.co", "password": "short", "name": "x"}),
        anon.post("/v1/auth/signup", json={"email": "a@b.co", "password": 12345678, "name": "x"}),
        anon.post("/v1/auth/signup", json={"email": "a@b.co", "name": "x"}),
        anon.post("/v1/auth/login", json={"email": "a@b.co", "password": "x", "admin": True}),
        anon.post("/v1/auth/login", content=b"email=a", headers={"Content-Type": "text/plain"}),
    ]
    for response in cases:
        assert 400 <= response.status_code < 500, response.text
        error = response.json()["error"]
        assert set(error) == {"code", "message"} and error["message"]
