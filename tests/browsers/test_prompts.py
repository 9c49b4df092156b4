"""Which ``initialPrompt`` is a URL to open, and which a task for the planner (a table)."""

from __future__ import annotations

import pytest

from dovecote.services.browsers.service import Tokens, is_url, url_of


@pytest.mark.parametrize(("prompt", "url"), [
    ("https://example.com/", "https://example.com/"),
    ("  http://localhost:8080/a?b=1  ", "http://localhost:8080/a?b=1"),
    ("example.com", "https://example.com"),
    ("docs.example.org/path?q=1", "https://docs.example.org/path?q=1"),
    ("data:text/html,<p>with spaces</p>", "data:text/html,<p>with spaces</p>"),
    ("about:blank", "about:blank"),
    ("Open https://example.com and log in", None),
    ("find the cheapest flight to Lisbon", None),
    ("1.5", None),
    ("localhost", None),
    ("http://", None),
    ("https://a b", None),
    ("file:///etc/hostname", None),
    ("javascript:alert(1)", None),
])
def test_url_or_task(prompt: str, url: str | None) -> None:
    assert is_url(prompt) is (url is not None)
    if url is not None:
        assert url_of(prompt) == url


def test_cdp_tokens_are_bound_to_a_session_and_expire() -> None:
    tokens = Tokens(ttl_s=60, key=b"k" * 32)
    token = tokens.mint("session-a", now=1000)
    assert tokens.check("session-a", token, now=1059)
    assert not tokens.check("session-a", token, now=1061)
    assert not tokens.check("session-b", token, now=1001)
    assert not tokens.check("session-a", token.replace(".", ".x"), now=1001)
    assert not Tokens(ttl_s=60).check("session-a", token, now=1001)  # another process's key
    for bad in ("", ".", "abc", "1000", "9" * 300):
        assert not tokens.check("session-a", bad, now=1001)
