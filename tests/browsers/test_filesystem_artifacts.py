"""Artifacts on the filesystem storage backend (presigned links served by the gateway); idle sessions.

Without S3 the storage is the data directory, and a presigned URL is the
gateway's own signed ``/v1/storage/...`` link; the session's ``publicUrl`` is
that link made absolute, and it downloads the PNG without credentials.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.browsers.helpers import Api, api_client
from tests.helpers.suite import Suite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite_and_api() -> Iterator[tuple[Suite, Api]]:
    for tool in ("bwrap", "setpriv", "chromium"):
        if shutil.which(tool) is None:
            pytest.fail(f"infra/system-deps.sh did not install {tool}")
    suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000", "DOVECOTE_BROWSER_HOST": "true",
                             "DOVECOTE_BROWSER_IDLE_TIMEOUT_S": "20"})
    try:
        suite.wait_ready()
        yield suite, api_client(suite, "Fay")
    finally:
        suite.stop()


def test_screenshot_links_download_through_the_gateway(suite_and_api: tuple[Suite, Api]) -> None:
    suite, api = suite_and_api
    session_id = api.create({"initialPrompt": "data:text/html,<title>Disk</title><p>on disk</p>"})
    api.wait(session_id, lambda s: s["status"] == "running" and s["screenshotCount"] >= 1)
    artifacts = api.get(f"/api/sessions/{session_id}/artifacts").json()["artifacts"]
    shot = next(a for a in artifacts if a["type"] == "screenshot")
    assert shot["publicUrl"].startswith(suite.url + "/v1/storage/"), shot
    downloaded = httpx.get(shot["publicUrl"], timeout=30)
    assert downloaded.status_code == 200 and downloaded.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert httpx.get(shot["publicUrl"].replace("sig=", "sig=x"), timeout=30).status_code in (401, 403, 404)
    assert api.delete(f"/api/sessions/{session_id}").json()["success"] is True


def test_an_idle_session_completes(suite_and_api: tuple[Suite, Api]) -> None:
    _, api = suite_and_api
    session_id = api.create({})
    api.wait_status(session_id, "running")
    deadline = time.monotonic() + 120
    while True:
        listed = api.get("/api/sessions", params={"includeTerminated": "true", "limit": 100}).json()
        status = next(s["status"] for s in listed["sessions"] if s["sessionId"] == session_id)
        if status != "running":
            break
        assert time.monotonic() < deadline
        time.sleep(2)
    session = api.get(f"/api/sessions/{session_id}").json()
    assert session["status"] == "completed" and session["error"]["code"] == "idle_timeout", session["error"]
