"""Capsules on real VMs, for the test modules that need one: a suite with the libvirt
driver, API clients, and waiting for a capsule's status.

:func:`running_capsule` skips when libvirt cannot be used on this machine (no
QEMU, no libvirt-python, libvirtd not startable): VM tests need the hypervisor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.accounts.helpers import Browser, signed_up_user
from tests.helpers.suite import Suite

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = os.environ.get("DOVECOTE_TEST_IMAGE_DIR", "/var/tmp/dovecote/images")
BOOT_TIMEOUT_S = 600

def libvirt_ready() -> str | None:
    """Why VM tests cannot run here, or None."""
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed"
    if shutil.which("qemu-system-x86_64") is None:
        return "QEMU is not installed"
    result = subprocess.run([str(ROOT / "infra" / "start-libvirt.sh")], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        return f"libvirtd is not available: {result.stderr.strip()}"
    return None


class Api:
    """A client of the capsule routes with an API key."""

    def __init__(self, suite: Suite, key: str) -> None:
        self.http = httpx.Client(base_url=suite.url, timeout=60, headers={"X-API-Key": key})
        self.browser: Browser | None = None

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body, **kw) if body is not None else self.http.post(path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.delete(path, **kw)


def api_client(suite: Suite, name: str) -> Api:
    browser, _, _ = signed_up_user(suite, name)
    response = browser.post("/v1/api-keys", {"name": f"{name}'s key"})
    assert response.status_code == 201, response.text
    api = Api(suite, response.json()["key"])
    api.browser = browser
    return api


def wait_status(api: Api, capsule_id: str, *statuses: str, timeout: float = BOOT_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        response = api.get(f"/v1/capsules/{capsule_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in statuses:
            return body
        assert body["status"] not in ("error", "missing") or body["status"] in statuses, body
        time.sleep(1)
    raise AssertionError(f"capsule never became {statuses}: {body}")


@contextlib.contextmanager
def running_capsule(prefix: str, extra_env: dict[str, str] | None = None
                    ) -> Iterator[tuple[Suite, Api, str]]:
    """A `dovecote up` with VMs and one running `minimal` capsule of a new user.

    Fails when libvirt cannot be used here; destroys the capsule and stops the
    suite whatever happens.
    """
    reason = libvirt_ready()
    if reason:
        pytest.fail(f"VM tests need libvirt (infra/system-deps.sh installs it): {reason}")
    # libvirt's QEMU runs as an unprivileged user: the capsule files' directories
    # must be searchable (mkdtemp makes 0700 directories).
    top = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    top.chmod(0o755)
    Path(IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    suite = Suite(data_dir=top / "data", extra_env={
        "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
        "DOVECOTE_VM_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S), **(extra_env or {})})
    try:
        suite.wait_ready()
        (top / "data").chmod(0o755)
        api = api_client(suite, "Ana")
        deadline = time.monotonic() + 1800  # a first build of the image takes minutes
        while True:
            response = api.post("/v1/capsules", {"template": "minimal", "vcpus": 1, "memory_mb": 512})
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["status"] == "starting" and body["id"].startswith("cap-")
        try:
            wait_status(api, body["id"], "running")
            yield suite, api, body["id"]
        finally:  # never leave a VM behind, whatever happened
            api.delete(f"/v1/capsules/{body['id']}")
            wait_status(api, body["id"], "stopped", "error", "missing", timeout=120)
    except BaseException:
        print("".join(suite.output[-200:]))
        raise
    finally:
        suite.stop()
        shutil.rmtree(top, ignore_errors=True)


def domains() -> set[str]:
    """The names of libvirt's domains (``dovecote-<capsule id>`` for capsules)."""
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        return {dom.name() for dom in conn.listAllDomains(0)}
    finally:
        conn.close()


class VmmgrHealth:
    """vmmgr's details in ``/healthz`` (pool counters such as ``spares``, ``prestarted``)."""

    suite: Suite

    def vmmgr(self) -> dict[str, str]:
        health = httpx.get(self.suite.url + "/healthz").json()
        details: dict[str, str] = health["services"]["vmmgr"]["details"]
        return details

    def count(self, key: str) -> int:
        return int(self.vmmgr().get(key, "0"))

    def wait_count(self, key: str, value: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.count(key) != value:
            assert time.monotonic() < deadline, f"{key} never became {value}: {self.vmmgr()}"
            time.sleep(0.5)
