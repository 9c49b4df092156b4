"""Faults under load: each service SIGKILLed in turn while clients work (see tests/helpers/faults.py).

One ``dovecote up`` with VMs (libvirt, TCG here) and two running capsules;
execs and file writes on them, a few creates (each destroyed again) and two
SSE clients, while the broker, the gateway and every service are SIGKILLed
one after the other, 5 s apart. The long version is ``benchmarks/faults.py``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.capsules import BOOT_TIMEOUT_S, IMAGE_DIR, api_client, libvirt_ready, wait_status
from tests.helpers.faults import KILLED_IN_TURN, FaultRun
from tests.helpers.suite import Suite, get_json

pytestmark = pytest.mark.slow


class World:
    def __init__(self, suite: Suite, key: str, capsules: list[str]) -> None:
        self.suite, self.key, self.capsules = suite, key, capsules


def start_faults_suite(prefix: str) -> tuple[Suite, Path]:
    """A ``dovecote up`` with VMs, in a fresh directory QEMU may read."""
    top = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    top.chmod(0o755)
    Path(IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    suite = Suite(data_dir=top / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
        "DOVECOTE_VM_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S),
        # A keepalive every 3 s: a silent stream for longer is a hang.
        "DOVECOTE_SSE_KEEPALIVE_S": "3"})
    return suite, top


def running_capsules(suite: Suite, count: int) -> tuple[str, list[str]]:
    """An API key and ``count`` running ``minimal`` capsules of its team."""
    (suite.data_dir).chmod(0o755)
    api = api_client(suite, "Faye")
    key = str(api.http.headers["X-API-Key"])
    ids: list[str] = []
    deadline = time.monotonic() + 1800  # a first build of the image takes minutes
    # Creates restore the built-in template once it is ready (about a second
    # under TCG, where a cold boot takes a minute or more on a busy machine).
    while get_json(suite.url + "/healthz")[1]["services"]["vmmgr"].get("details", {}).get(
            "template") != "ready":
        assert time.monotonic() < deadline, "the built-in template was never ready"
        time.sleep(3)
    while len(ids) < count:
        response = api.post("/v1/capsules", {"template": "minimal"})
        if response.status_code == 503 and time.monotonic() < deadline:
            time.sleep(3)
            continue
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
        wait_status(api, ids[-1], "running")
    return key, ids


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = libvirt_ready()
    if reason:
        pytest.skip(reason)
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
