"""End to end on a real QEMU desktop session: review recording, export to S3, the live view.

``dovecote up`` with VMs, the desktop template and S3 (a moto server this
test starts); one qemu desktop session (``POST /api/sessions``). Five actions,
two of which leave the screen as it was, then an export: ``timeline.jsonl``
lists every action in order with its receipt status, the unchanged screens are
stored once, every hash matches its file, and the presigned URLs download the
same bytes. A real headless Chromium opens the session's ``canonical_url``
(with a viewer token) and renders the desktop; a change made by an action
appears in it within 2 seconds; without credentials or with an expired token
the page is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from dovecote.gateway.routes.live_view import mint_token
from tests.desktops.png import decode
from tests.helpers.capsules import IMAGE_DIR, Api, api_client, libvirt_ready
from tests.helpers.suite import Suite
from tests.recorder.helpers import moto_server, s3_env

pytestmark = pytest.mark.slow
SECRET = "desktop-session-live-view-secret"
READY_TIMEOUT_S = 1800


class World:
    suite: Suite
    api: Api
    s3: Any
    bucket: str
    session: dict[str, Any]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = libvirt_ready()
    if reason:
        pytest.fail(f"VM tests need libvirt (infra/system-deps.sh installs it): {reason}")
    top = Path(tempfile.mkdtemp(prefix="dcdsr-", dir="/tmp"))
    top.chmod(0o755)
    with moto_server() as s3_url:
        w = World()
        w.bucket = f"review-{uuid.uuid4().hex[:8]}"
        w.s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")
        w.suite = Suite(data_dir=top / "data", extra_env={
            "DOVECOTE_VM_DRIVER": "libvirt", "DOVECOTE_VM_IMAGE_DIR": IMAGE_DIR,
            "DOVECOTE_DESKTOP_TEMPLATE": "true", "DOVECOTE_LIVE_VIEW_SECRET": SECRET,
            "DOVECOTE_SIGNUP_MAX_PER_IP": "100000", **s3_env(s3_url, w.bucket)})
        try:
            w.suite.wait_ready()
            (top / "data").chmod(0o755)
            w.api = api_client(w.suite, "Ana")
            yield w
        except BaseException:
            print("".join(w.suite.output[-150:]))
            raise
        finally:
            sid = getattr(w, "session", {}).get("id")
            if sid:
                w.api.delete(f"/api/sessions/{sid}")
            w.suite.stop()
            shutil.rmtree(top, ignore_errors=True)


def _act(world: World, action: dict[str, Any]) -> dict[str, Any]:
    response = world.api.post(f"/api/sessions/{world.session['id']}/actions", action)
    assert response.status_code == 200, response.text
    receipt: dict[str, Any] = response.json()
    return receipt


def _paint(colour: str) -> dict[str, Any]:
    return {"kind": "run_command", "command": f"xsetroot -solid '{colour}'", "run_as_user": "desktop"}


def test_a_qemu_session_records_a_sparse_timeline_and_streams_its_display(world: World) -> None:
    created = world.api.post("/api/sessions", {"width": 1024, "height": 768})
    assert created.status_code == 201, created.text
    world.session = created.json()["session"]
    sid = world.session["id"]
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        session = world.api.get(f"/api/sessions/{sid}").json()["session"]
        if session["readiness_state"] in ("runtime_ready", "failed") or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert session["readiness_state"] == "runtime_ready", session
    # The view's status comes from a probe re-run at most every 10 s: it may still
    # describe the screen before the desktop was up.
    deadline = time.monotonic() + 60
    while session["live_desktop_view"]["status"] != "ready" and time.monotonic() < deadline:
        time.sleep(2)
        session = world.api.get(f"/api/sessions/{sid}").json()["session"]
    view = session["live_desktop_view"]
    assert view["mode"] == "stream" and view["provider_surface"] == "qemu_novnc", view
    assert view["status"] == "ready" and view["matches_action_plane"] is True, view
    assert view["canonical_url"] == f"/api/sessions/{sid}/live-view/"
    review = session["review_recording"]
    assert review["mode"] == "sparse_timeline" and review["retention"] == "ephemeral_until_export"
    assert review["event_count"] >= 1 and review["exportable"] is True, review
    world.session = session


def test_five_actions_export_to_s3_deduplicated_with_matching_hashes(world: World) -> None:
    sid = world.session["id"]
    before = world.api.get(f"/api/sessions/{sid}").json()["session"]["review_recording"]["event_count"]
    actions = [_paint("#c81e1e"), {"kind": "run_command", "command": "true"}, _paint("#1ec81e"),
               {"kind": "read_file", "path": "/etc/hostname"}, _paint("#1e1ec8")]
    receipts = [_act(world, a) for a in actions]
    assert [r["status"] for r in receipts] == ["ok"] * 5, receipts
    summary = world.api.get(f"/api/sessions/{sid}").json()["session"]["review_recording"]
    # Every action is an entry (a readiness entry may still land meanwhile; the exported
    # timeline below checks the actions one by one, in order).
    assert summary["event_count"] >= before + 5 and summary["status"] == "active", summary
    exported = world.api.post(f"/api/sessions/{sid}/review/export")
    assert exported.status_code == 200, exported.text
    body = exported.json()
    prefix = f"exports/{sid}-review"
    assert body["bundle"] == {"kind": "review_bundle", "path": f"s3://{world.bucket}/{prefix}",
                              "mime_type": None}
    assert body["review_recording"]["status"] == "exported"
    assert body["review_recording"]["exported_bundle"] == body["bundle"]
    objects = {}
    for item in world.s3.list_objects_v2(Bucket=world.bucket, Prefix=prefix + "/")["Contents"]:
        objects[item["Key"]] = world.s3.get_object(Bucket=world.bucket, Key=item["Key"])["Body"].read()
    lines = [json.loads(x) for x in objects[f"{prefix}/timeline.jsonl"].splitlines()]
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))
    mine = [x for x in lines if x["kind"] == "action"][-5:]
    assert [x["summary"]["action"]["kind"] for x in mine] == [a["kind"] for a in actions]
    assert [x["summary"]["receipt"]["receipt_id"] for x in mine] == [r["receipt_id"] for r in receipts]
    assert [x["summary"]["receipt"]["status"] for x in mine] == ["ok"] * 5
    shas = [x["screenshot"]["sha256"] for x in mine]
    assert shas[1] == shas[0] and shas[3] == shas[2], shas  # unchanged screens: the same file
    assert len(set(shas)) == 3
    screenshots = {k: v for k, v in objects.items() if "/screenshots/" in k}
    for key, data in screenshots.items():
        assert key.endswith(f"/{hashlib.sha256(data).hexdigest()}.png")
    assert {x["screenshot"]["sha256"] for x in lines if x["screenshot"]} == {
        k.rsplit("/", 1)[1][:-4] for k in screenshots}
    review = json.loads(objects[f"{prefix}/review.json"])
    assert review["event_count"] == len(lines) and review["screenshot_count"] == len(screenshots)
    links = world.api.get(f"/api/sessions/{sid}/review/bundle")
    assert links.status_code == 200, links.text
    for f in links.json()["files"]:
        got = httpx.get(f["url"], timeout=30)
        assert got.status_code == 200 and got.content == objects[f"{prefix}/{f['name']}"]


def _shot(page: Any) -> list[bytes]:
    box = page.locator("#screen canvas").bounding_box()
    _, _, rows = decode(page.screenshot(clip=box))
    return rows


def _has(rows: list[bytes], rgb: bytes) -> bool:
    hits = sum(1 for row in rows[::9] for i in range(0, len(row), 27) if row[i:i + 3] == rgb)
    return hits > 50


def test_chromium_shows_the_session_and_an_action_within_two_seconds(world: World) -> None:
    from playwright.sync_api import sync_playwright

    sid = world.session["id"]
    page_url = world.suite.url + f"/api/sessions/{sid}/live-view/"
    assert httpx.get(page_url, timeout=30).status_code == 401
    expired = mint_token(SECRET.encode(), "session", sid, "x", int(time.time()) - 1)
    assert httpx.get(f"{page_url}?token={expired}&path=x", timeout=30).status_code == 401
    token = world.api.post(f"/api/sessions/{sid}/live-view/token")
    assert token.status_code == 200, token.text
    url = world.suite.url + token.json()["url"]
    assert world.api.http.headers["X-API-Key"] not in url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 850})
            assert page.goto(url, timeout=60_000).status == 200  # type: ignore[union-attr]
            page.wait_for_function(
                "() => document.getElementById('status').textContent.startsWith('Connected')",
                timeout=60_000)
            deadline = time.monotonic() + 20
            while not _has(_shot(page), bytes((0x1e, 0x1e, 0xc8))) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _has(_shot(page), bytes((0x1e, 0x1e, 0xc8))), "the desktop is not rendered"
            _act(world, _paint("#c8c81e"))
            answered = time.monotonic()
            while not _has(_shot(page), bytes((0xc8, 0xc8, 0x1e))):
                assert time.monotonic() - answered < 2.0, "the change did not show within 2 s"
                time.sleep(0.05)
        finally:
            browser.close()


def test_deleting_the_session_drops_its_evidence_but_not_the_export(world: World) -> None:
    sid = world.session["id"]
    assert world.api.delete(f"/api/sessions/{sid}").status_code == 200
    world.session = {}
    keys = [o["Key"] for o in world.s3.list_objects_v2(Bucket=world.bucket).get("Contents", [])]
    assert any(k.startswith(f"exports/{sid}-review/") for k in keys)
    exported = {k.rsplit("/", 1)[1][:-4] for k in keys if "/screenshots/" in k}
    runtime = [k for k in keys if k.startswith("recorder/blobs/")]
    assert not [k for k in runtime if k.rsplit("/", 1)[1] in exported], runtime
    links = world.api.get(f"/api/sessions/{sid}/review/bundle")
    assert links.status_code == 200  # the exported bundle outlives its session
