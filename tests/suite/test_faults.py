"""Faults under load: each service SIGKILLed in turn while clients work (see tests/helpers/faults.py).

One ``dovecote up`` with VMs (libvirt, TCG here) and two running capsules;
execs and file writes on them, a few creates (each destroyed again) and two
SSE clients, while the broker, the gateway and every service are SIGKILLed
one after the other, 5 s apart. The long version is ``benchmarks/faults.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.helpers.capsules import libvirt_ready
from tests.helpers.faults import KILLED_IN_TURN, FaultRun, running_capsules, start_faults_suite
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow


class World:
    def __init__(self, suite: Suite, key: str, capsules: list[str]) -> None:
        self.suite, self.key, self.capsules = suite, key, capsules


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = libvirt_ready()
    if reason:
        pytest.fail(f"the faults test needs libvirt: {reason}")
    suite, top = start_faults_suite("dcfault-")
    try:
        suite.wait_ready()
        key, capsules = running_capsules(suite, 2)
        yield World(suite, key, capsules)
    except BaseException:
        print("".join(suite.output[-200:]))
        raise
    finally:
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


async def test_each_service_killed_under_load_comes_back_and_loses_nothing(world: World) -> None:
    run = FaultRun(world.suite, world.key, world.capsules, max_creates=8, sse_clients=2)
    problems = await run.run(KILLED_IN_TURN, rounds=1, spacing_s=5.0, limit_s=10.0)
    print(run.summary())
    print(run.timeline())
    if problems:
        print("".join(world.suite.output[-300:]))
    assert not problems, "\n".join(problems)
    # The load really ran through the faults: every kind of request succeeded.
    done = {o.op for o in run.ledger.outcomes if o.ok}
    assert {"exec", "write", "create", "destroy", "pause", "resume"} <= done, run.summary()
    assert run.ledger.settled["pause"] and run.ledger.settled["resume"], run.summary()
    assert {f.service for f in run.faults} == set(KILLED_IN_TURN)
    assert all(c.ids for c in run.sse_clients) and all(c.connects >= 2 for c in run.sse_clients)
