"""Browser sessions on the VM provider, end to end, on a real QEMU VM under TCG.

One ``dovecote up`` with the libvirt driver and ``DOVECOTE_BROWSER_TEMPLATE=true``
for the module, and one shared session (the tests run in file order). The
first run on a host builds the desktop image (``infra/guest/desktop.py``, if
its inputs changed) and the browser template (a cold boot and a Chromium start
under TCG, then frozen), cached in the shared image directory; after that a
session is a restore with Chromium already running.

Everything is real: the capsule restored from the template, the DevTools
WebSocket spoken by the browsers service over a ``StreamTcp`` bus stream
through vmmgr and the guest agent (which opens the TCP connection on the
guest's loopback), the gateway's WebSocket, Playwright's ``connect_over_cdp``,
PostgreSQL, and a moto S3 server for the artifacts. The guest has no route to
the host, so pages are ``data:`` URLs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.browsers.helpers import FIRST, FORM, Api, api_client
from tests.helpers.capsules import IMAGE_DIR, domains, libvirt_ready
from tests.helpers.suite import Suite
from tests.recorder.helpers import moto_server

pytestmark = pytest.mark.slow

TEMPLATE_BUILD_S = 3000.0
"""The first run on a host may build the desktop image and the browser template."""
RESTORE_S = 240.0
"""From create to running once the template is cached (a restore under TCG, on a loaded machine)."""
FAILED_WITHIN_S = 10.0


class World:
    suite: Suite
    ana: Api
    bob: Api
    session_id: str
    session: dict[str, Any]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = libvirt_ready()
    if reason:
        pytest.fail(f"the VM browser tests need libvirt: {reason}")
    root = Path(tempfile.mkdtemp(prefix="dcvmbrowser-", dir="/tmp"))
    root.chmod(0o755)
    w = World()
    with moto_server() as s3:
        w.suite = Suite(data_dir=root / "data", extra_env={
            "DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_VM_DRIVER": "libvirt",
            "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR, "DOVECOTE_VM_BOOT_TIMEOUT_S": "900",
            "DOVECOTE_VM_TEMPLATES": "true",  # the warm pool (it keeps browser spares too)
            "DOVECOTE_BROWSER_TEMPLATE": "true", "DOVECOTE_TEAM_MAX_CAPSULES": "3",
            "DOVECOTE_BROWSER_PROVISION_TIMEOUT_S": "180",
            "S3_ENDPOINT_URL": s3, "S3_BUCKET": "browser-artifacts", "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"})
        try:
            w.suite.wait_ready()
            (root / "data").chmod(0o755)
            w.ana, w.bob = api_client(w.suite, "Ana"), api_client(w.suite, "Bob")
            yield w
        except BaseException:
            print("".join(w.suite.output[-200:]))
            raise
        finally:
            w.suite.stop()
            shutil.rmtree(root, ignore_errors=True)
    output = "".join(w.suite.output)
    assert w.ana.key not in output and "?token=" not in output  # secrets are never logged


def test_create_restores_the_browser_template_and_opens_the_initial_url(world: World) -> None:
    started = time.monotonic()
    response = world.ana.post("/api/sessions", {"initialPrompt": FIRST, "options": {
        "browser": "chromium", "viewport": {"width": 800, "height": 600}}})
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 30
    created = response.json()
    assert set(created) == {"sessionId", "status", "machineId"} and created["status"] == "creating"
    world.session_id = created["sessionId"]
    session = world.ana.wait(world.session_id, lambda s: s["status"] == "running" and s["title"] == "First"
                             and s["navigationHistory"] != [], timeout=TEMPLATE_BUILD_S)
    # machineId is the session's capsule: a real VM of this host.
    assert session["machineId"] and f"dovecote-{session['machineId']}" in domains()
    assert session["provider"] == "vm" and session["isolation"] == "vm"
    assert session["currentUrl"] == FIRST and session["viewport"] == {"width": 800, "height": 600}
    assert [h["status"] for h in session["statusHistory"]] == ["creating", "running"]
    assert session["connectUrl"].startswith("ws://") and "?token=" in session["connectUrl"]
    # Another team sees nothing of it.
    assert world.bob.get(f"/api/sessions/{world.session_id}").status_code == 404
    world.session = session


def test_playwright_drives_the_browser_in_the_vm_through_the_gateway(world: World) -> None:
    with sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(world.session["connectUrl"], timeout=120_000)
        context = browser.contexts[0]
        first = next(pg for pg in context.pages if pg.url == FIRST)
        assert first.evaluate("[innerWidth, innerHeight]") == [800, 600]  # the session's viewport
        page = context.new_page()
        page.goto(FORM, timeout=120_000)
        page.fill("#name", "Ana")
        page.click("#go")
        page.wait_for_function("document.getElementById('out').textContent !== ''", timeout=60_000)
        assert page.text_content("#out") == "Hello Ana"
        assert page.title() == "Form"
        page.screenshot(timeout=120_000)
        browser.close()
    body = world.ana.get(f"/api/sessions/{world.session_id}/actions").json()
    kinds = [a["type"] for a in body["actions"]]
    assert body["total"] == len(kinds)
    assert kinds[0] == "navigate" and body["actions"][0]["details"]["url"] == FIRST
    after = kinds[1:]
    order = [after.index("navigate"), after.index("type"), after.index("click"), after.index("screenshot")]
    assert order == sorted(order), kinds
    nav = body["actions"][1 + after.index("navigate")]
    assert nav["details"]["url"] == FORM and nav["success"] is True and nav["source"] == "cdp"
    assert body["actions"][1 + after.index("type")]["details"]["text"] == "Ana"
    for action in body["actions"]:
        assert isinstance(action["duration"], int) and action["duration"] >= 0
        assert action["cost"] == {"tokens": 0, "price": 0.0}
    assert any(a["duration"] > 0 for a in body["actions"])


def test_console_and_network_are_captured_from_the_vm(world: World) -> None:
    logs = world.ana.get(f"/api/sessions/{world.session_id}/console").json()["logs"]
    pairs = [(entry["level"], entry["message"]) for entry in logs]
    assert ("log", "page loaded") in pairs and ("error", "bad thing") in pairs, pairs
    requests = world.ana.get(f"/api/sessions/{world.session_id}/network").json()["requests"]
    fetched = [r for r in requests if r["url"] == "data:text/plain,hello"]
    assert fetched and fetched[0]["method"] == "GET" and fetched[0]["status"] == 200, requests
    first = [r for r in requests if r["url"] == FIRST]
    assert first and first[0]["status"] == 200 and first[0]["duration"] is not None, requests


def test_artifacts_are_screenshots_with_working_signed_urls(world: World) -> None:
    deadline = time.monotonic() + 60
    while True:
        artifacts = world.ana.get(f"/api/sessions/{world.session_id}/artifacts").json()["artifacts"]
        shots = [a for a in artifacts if a["type"] == "screenshot"]
        if len(shots) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(shots) >= 2, artifacts  # at each navigation, and Playwright's
    for shot in shots:
        downloaded = httpx.get(shot["publicUrl"], timeout=30)
        assert downloaded.status_code == 200 and downloaded.content.startswith(b"\x89PNG\r\n\x1a\n")
    health = world.ana.get(f"/api/sessions/{world.session_id}/health").json()
    assert health["browserResponsive"] is True and health["status"] == "healthy"


def test_a_session_whose_vm_dies_is_failed_within_seconds(world: World) -> None:
    domain = f"dovecote-{world.session['machineId']}"
    subprocess.run(["virsh", "-c", "qemu:///system", "destroy", domain], check=True, capture_output=True,
                   timeout=60)
    killed = time.monotonic()
    session = world.ana.wait_status(world.session_id, "failed", "completed", "cancelled", timeout=60)
    took = time.monotonic() - killed
    assert session["status"] == "failed" and session["error"]["code"] == "vm_exited", session
    assert took < FAILED_WITHIN_S, f"failed after {took:.1f} s"


def test_a_create_claims_a_warm_spare_and_delete_ends_the_browser_and_its_vm(world: World) -> None:
    """vmmgr's warm pool keeps a browser spare (restored from the template and warmed up
    ahead of time): a create takes it, so the session's VM ran before the create was asked for."""
    for attempt in range(4):  # the pool makes its next spare 10 s after a claim
        before = domains()
        began = time.monotonic()
        session_id = world.ana.create({"initialPrompt": "about:blank"})
        session = world.ana.wait(session_id, lambda s: s["status"] == "running", timeout=RESTORE_S)
        print(f"create -> running from the template: {time.monotonic() - began:.1f} s")
        domain = f"dovecote-{session['machineId']}"
        assert domain in domains()
        if domain in before or attempt == 3:
            break
        assert world.ana.delete(f"/api/sessions/{session_id}").status_code == 200
        time.sleep(20)
    assert domain in before, "no browser create found a warm spare"
    response = world.ana.delete(f"/api/sessions/{session_id}")
    assert response.status_code == 200 and response.json() == {"success": True,
                                                               "message": "Session terminated"}
    assert world.ana.get(f"/api/sessions/{session_id}").json()["status"] == "cancelled"
    deadline = time.monotonic() + 90
    while domain in domains():
        assert time.monotonic() < deadline, f"{domain} still runs after DELETE"
        time.sleep(1)
