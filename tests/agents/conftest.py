"""One ``dovecote up`` (no VMs) for the agent runtime's HTTP tests, with a fast lease sweeper."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.suite import Suite


@pytest.fixture(scope="session")
def agents_suite() -> Iterator[Suite]:
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_AGENTS_SWEEP_EVERY_S": "0.2"})
    try:
        suite.wait_ready()
        yield suite
    finally:
        suite.stop()
