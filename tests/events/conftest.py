"""One ``dovecote up`` for the event stream tests, with short intervals:
keepalives every second, a small per-client queue, hosts silent after 3 s."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from tests.accounts.helpers import Browser
from tests.helpers.suite import Suite
from tests.hosts.helpers import create_admin, regular_user

KEEPALIVE_S = 1
QUEUE_EVENTS = 64
HOST_SILENCE_S = 3


@pytest.fixture(scope="session")
def events_suite() -> Iterator[Suite]:
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000",
                             "DOVECOTE_SSE_KEEPALIVE_S": str(KEEPALIVE_S),
                             "DOVECOTE_SSE_QUEUE_EVENTS": str(QUEUE_EVENTS),
                             "DOVECOTE_HOST_SILENCE_S": str(HOST_SILENCE_S)})
    try:
        suite.wait_ready()
        yield suite
    finally:
        suite.stop()


class Member(NamedTuple):
    """A signed-in owner of a team of their own, with an API key of that team."""

    browser: Browser
    team_id: str
    key: str


def member(suite: Suite, name: str) -> Member:
    browser, login = regular_user(suite, name)
    created = browser.post("/v1/api-keys", {"name": "events"})
    assert created.status_code == 201, created.text
    return Member(browser=browser, team_id=login["team_id"], key=created.json()["key"])


@pytest.fixture(scope="session")
def admin(events_suite: Suite) -> tuple[Browser, dict[str, Any]]:
    return create_admin(events_suite, "Eventadmin")


# The admin first: the first account of an installation becomes its admin.
@pytest.fixture(scope="session")
def team_a(events_suite: Suite, admin: tuple[Browser, dict[str, Any]]) -> Member:
    return member(events_suite, "Ana")


@pytest.fixture(scope="session")
def team_b(events_suite: Suite, admin: tuple[Browser, dict[str, Any]]) -> Member:
    return member(events_suite, "Bob")
