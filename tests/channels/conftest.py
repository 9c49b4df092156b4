"""One ``dovecote up`` for the channel tests, with fast retries, and a local receiver.

The receiver starts first: the suite's Telegram API URL points at it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.channels.receiver import Receiver
from tests.helpers.suite import Suite


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(scope="session")
def channel_suite(receiver: Receiver) -> Iterator[Suite]:
    suite = Suite(extra_env={
        "DOVECOTE_SIGNUP_MAX_PER_IP": "100000",
        "DOVECOTE_CHANNEL_ALLOW_PRIVATE_URLS": "true",  # the receivers are on 127.0.0.1
        "DOVECOTE_TELEGRAM_API_URL": receiver.url + "/telegram",
        "DOVECOTE_DELIVERY_BACKOFF_BASE_S": "0.3",
        "DOVECOTE_DELIVERY_BACKOFF_MAX_S": "1.5",
        "DOVECOTE_DELIVERY_MAX_ATTEMPTS": "5",
        "DOVECOTE_DELIVERY_TIMEOUT_S": "3",
        "DOVECOTE_DELIVERY_LEASE_MARGIN_S": "2",
        "DOVECOTE_DELIVERY_POLL_S": "1",
        "DOVECOTE_CHANNEL_TEST_TIMEOUT_S": "3",
    })
    try:
        suite.wait_ready()
        yield suite
    finally:
        suite.stop()
