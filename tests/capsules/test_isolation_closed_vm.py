"""Isolation fails closed: without the network guard, no capsule runs.

A suite whose vmmgr cannot install the guard (its ``nft`` points nowhere, as
on a machine without nftables) refuses creates with 503
``isolation_unavailable`` naming the cause, and ``/healthz`` says so. The
guest image and the built-in template come from the machine's cache (built
by the other VM tests or the first ``dovecote up``); no VM boots here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.capsules import BOOT_TIMEOUT_S, IMAGE_DIR, api_client, libvirt_ready
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow


def _vmmgr_details(suite: Suite) -> dict[str, Any]:
    body = httpx.get(suite.url + "/healthz", timeout=10).json()
    return dict(body["services"]["vmmgr"].get("details") or {})


@pytest.fixture(scope="module")
def unguarded() -> Iterator[Suite]:
    reason = libvirt_ready()
    assert reason is None, reason
    top = Path(tempfile.mkdtemp(prefix="dciso-", dir="/tmp"))
    top.chmod(0o755)
    suite = Suite(data_dir=top / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
        "DOVECOTE_VM_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S), "DOVECOTE_VM_POOL_SIZE": "0",
        "DOVECOTE_VM_NFT_BINARY": "/nonexistent/nft"})
    try:
        suite.wait_ready()
        (top / "data").chmod(0o755)
        deadline = time.monotonic() + 1800  # a first build of the image takes minutes
        while _vmmgr_details(suite).get("image") != "ready":
            assert time.monotonic() < deadline, _vmmgr_details(suite)
            time.sleep(2)
        yield suite
    except BaseException:
        print("".join(suite.output[-200:]))
        raise
    finally:
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


def test_healthz_says_the_guard_failed_and_why(unguarded: Suite) -> None:
    netguard = _vmmgr_details(unguarded)["netguard"]
    assert netguard.startswith("failed: nft is not installed"), netguard
    assert "capsules are refused" in netguard


def test_creates_are_refused_with_isolation_unavailable(unguarded: Suite) -> None:
    api = api_client(unguarded, "Ivy")
    response = api.post("/v1/capsules", {"template": "minimal", "vcpus": 1, "memory_mb": 512})
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "isolation_unavailable"
    assert "nft is not installed" in error["message"]
    assert api.get("/v1/capsules").json() == []  # nothing was recorded, nothing boots
