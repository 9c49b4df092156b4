"""The recorder over the real bus, with the real PostgreSQL and a real S3 endpoint (moto server).

Each test starts the recorder service in-process (``serve_service``: its
migrations, its bus handlers) on a fresh ``recorder`` schema and a fresh bucket,
and talks to it only through bus requests; what it stored is checked in S3
with boto3 and through the presigned URLs it hands out.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
import urllib.request
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
import trio

from dovecote.bus import Broker, BusEndpoints, open_bus
from dovecote.bus.messages import recorder as r
from dovecote.libs.config import load_config
from dovecote.libs.errors import NotFound, ServiceError
from dovecote.libs.runtime import serve_service
from dovecote.recorder.service import SPEC
from tests.recorder.helpers import png, s3_env


class Rig:
    def __init__(self, bus: Any, bucket: str, s3: Any, root: Path) -> None:
        self.bus, self.bucket, self.s3, self.root = bus, bucket, s3, root

    async def ask(self, msg: Any) -> Any:
        return await self.bus.request("recorder", msg, timeout=30)

    def objects(self, prefix: str) -> dict[str, bytes]:
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = self.s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
        return out


@pytest.fixture
async def rig(endpoints: BusEndpoints, broker: Broker, postgres_url: str, s3_url: str,
              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS recorder CASCADE")
    bucket = f"rec-{uuid.uuid4().hex[:12]}"
    for name, value in s3_env(s3_url, bucket).items():
        monkeypatch.setenv(name, value)
    (tmp_path / "images").mkdir()
    (tmp_path / "xvfb").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
    env.update(endpoints.to_env())
    env.update({"DATABASE_URL": postgres_url, "DOVECOTE_DATA_DIR": str(tmp_path / "data"),
                "DOVECOTE_SHUTDOWN_GRACE_S": "5", "DOVECOTE_VM_IMAGE_DIR": str(tmp_path / "images"),
                "DOVECOTE_DESKTOP_XVFB_ROOT": str(tmp_path / "xvfb"),
                "DOVECOTE_RECORDER_RECLAIM_STALE_S": "3600", "DOVECOTE_RECORDER_ORPHAN_GRACE_S": "0"})
    config = load_config(SPEC.config_cls, env)
    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    with trio.fail_after(120):
        async with open_bus(endpoints, "probe") as bus, trio.open_nursery() as nursery:
            ctx = await nursery.start(lambda task_status: serve_service(
                SPEC, config, environ=env, task_status=task_status))
            yield Rig(bus, bucket, s3, tmp_path)
            ctx.stop()


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def _receipt(i: int, status: str = "ok") -> dict[str, Any]:
    return {"action": {"kind": "type_text", "text": f"step {i}"},
            "receipt": {"status": status, "receipt_id": str(uuid.uuid4()), "action_type": "type_text"}}


async def _five_actions(rig: Rig, sid: str) -> list[bytes]:
    """Five actions; the 3rd and 5th leave the screen as it was (3 distinct screens)."""
    screens = [png(64, 48, (10, 20, 30), mark=m) for m in (1, 5, 5, 9, 9)]
    for i, screen in enumerate(screens, 1):
        got = await rig.ask(r.RecordEntry(subject_id=sid, kind="action", actor="api_key:k1",
                                          summary=_receipt(i, "error" if i == 4 else "ok"),
                                          screenshot_png=screen))
        assert got.seq == i
        assert got.screenshot_sha256 == hashlib.sha256(screen).hexdigest()
        assert got.screenshot_new is (i not in (3, 5))
    return screens


async def test_an_unchanged_screen_is_stored_once_and_the_export_matches_its_hashes(rig: Rig) -> None:
    sid = "sess-" + uuid.uuid4().hex[:8]
    opened = await rig.ask(r.OpenSubject(subject_id=sid, team_id="team-a", meta={"provider": "qemu"}))
    assert opened.summary.mode == "sparse_timeline" and opened.summary.exportable is False
    screens = await _five_actions(rig, sid)
    # one object per distinct screen in the runtime tier
    blobs = rig.objects("recorder/blobs/")
    assert sorted(hashlib.sha256(b).hexdigest() for b in blobs.values()) == sorted(
        {hashlib.sha256(s).hexdigest() for s in screens})
    summary = (await rig.ask(r.GetSummary(subject_id=sid, team_id="team-a"))).summary
    assert (summary.event_count, summary.screenshot_count, summary.status) == (5, 3, "active")
    assert summary.exportable and summary.last_captured_at is not None

    started = time.monotonic()
    exported = await rig.ask(r.ExportBundle(subject_id=sid, team_id="team-a"))
    assert time.monotonic() - started < 5
    prefix = f"exports/{sid}-review"
    assert exported.bundle.kind == "review_bundle"
    assert exported.bundle.path == f"s3://{rig.bucket}/{prefix}"
    assert exported.review_recording.status == "exported"
    assert exported.review_recording.exported_bundle.path == exported.bundle.path
    files = rig.objects(prefix + "/")
    assert sorted(files) == sorted([f"{prefix}/review.json", f"{prefix}/timeline.jsonl"]
                                   + [f"{prefix}/screenshots/{hashlib.sha256(s).hexdigest()}.png"
                                      for s in {*screens}])
    for key, data in files.items():
        if "/screenshots/" in key:
            assert key.endswith(f"/{hashlib.sha256(data).hexdigest()}.png")
    lines = [json.loads(x) for x in files[f"{prefix}/timeline.jsonl"].splitlines()]
    assert [x["seq"] for x in lines] == [1, 2, 3, 4, 5]
    assert [x["summary"]["action"]["text"] for x in lines] == [f"step {i}" for i in range(1, 6)]
    assert [x["summary"]["receipt"]["status"] for x in lines] == ["ok", "ok", "ok", "error", "ok"]
    for line, screen in zip(lines, screens, strict=True):
        assert line["screenshot"]["sha256"] == hashlib.sha256(screen).hexdigest()
        assert f"{prefix}/{line['screenshot']['file']}" in files
    review = json.loads(files[f"{prefix}/review.json"])
    assert (review["event_count"], review["screenshot_count"]) == (5, 3)
    assert review["timeline"]["sha256"] == hashlib.sha256(files[f"{prefix}/timeline.jsonl"]).hexdigest()
    assert review["subject"]["meta"] == {"provider": "qemu"}
    # a bundle no bigger than its distinct screenshots plus 1 KB per action
    assert sum(map(len, files.values())) <= sum(len(s) for s in {*screens}) + 1024 * 5

    links = await rig.ask(r.GetBundle(subject_id=sid, team_id="team-a", expires_s=60))
    for f in links.files:
        body = await trio.to_thread.run_sync(_download, f.url)
        assert body == files[f"{prefix}/{f.name}"] and hashlib.sha256(body).hexdigest() == f.sha256
    archive = zipfile.ZipFile(io.BytesIO(await trio.to_thread.run_sync(_download, links.zip_url)))
    assert sorted(archive.namelist()) == sorted(f"{sid}-review/{f.name}" for f in links.files)

    # more actions, export again: a complete bundle, only the new screen uploaded (+2 files)
    for i, screen in ((6, screens[-1]), (7, png(64, 48, (200, 0, 0)))):
        await rig.ask(r.RecordEntry(subject_id=sid, kind="action", summary=_receipt(i),
                                    screenshot_png=screen))
    assert (await rig.ask(r.GetSummary(subject_id=sid))).summary.status == "active"
    again = await rig.ask(r.ExportBundle(subject_id=sid, team_id="team-a"))
    assert again.uploaded == 3
    lines = [json.loads(x) for x in rig.objects(prefix + "/timeline.jsonl")[
        f"{prefix}/timeline.jsonl"].splitlines()]
    assert [x["seq"] for x in lines] == list(range(1, 8))
    assert len(rig.objects(prefix + "/screenshots/")) == 4


async def test_requests_of_another_team_and_bad_input_are_refused(rig: Rig) -> None:
    sid = "sess-" + uuid.uuid4().hex[:8]
    await rig.ask(r.OpenSubject(subject_id=sid, team_id="team-a"))
    with pytest.raises(NotFound):
        await rig.ask(r.GetSummary(subject_id=sid, team_id="team-b"))
    with pytest.raises(NotFound):
        await rig.ask(r.ExportBundle(subject_id=sid, team_id="team-b"))
    with pytest.raises(ServiceError) as bad:
        await rig.ask(r.RecordEntry(subject_id=sid, kind="action", screenshot_png=b"GIF89a..."))
    assert bad.value.status == 400 and bad.value.code == "invalid_screenshot"
    with pytest.raises(ServiceError) as empty:
        await rig.ask(r.ExportBundle(subject_id=sid))
    assert empty.value.status == 409 and empty.value.details["review_recording"]["mode"] == "unavailable"
    with pytest.raises(NotFound):
        await rig.ask(r.GetBundle(subject_id=sid))


async def test_closing_drops_ephemeral_evidence_but_keeps_screens_others_use_and_the_export(rig: Rig) -> None:
    shared = png(32, 32, (1, 2, 3))
    mine = png(32, 32, (4, 5, 6))
    a, b = "sess-" + uuid.uuid4().hex[:8], "sess-" + uuid.uuid4().hex[:8]
    for sid in (a, b):
        await rig.ask(r.OpenSubject(subject_id=sid, team_id="t"))
        await rig.ask(r.RecordEntry(subject_id=sid, kind="action", screenshot_png=shared))
    await rig.ask(r.RecordEntry(subject_id=a, kind="state_change", screenshot_png=mine))
    await rig.ask(r.ExportBundle(subject_id=a))
    closed = await rig.ask(r.CloseSubject(subject_id=a))
    assert closed.summary.mode == "unavailable" and "ephemeral_until_export" in closed.summary.reason
    assert closed.summary.exported_bundle is not None
    blobs = {hashlib.sha256(v).hexdigest() for v in rig.objects("recorder/blobs/").values()}
    assert blobs == {hashlib.sha256(shared).hexdigest()}
    assert len(rig.objects(f"exports/{a}-review/screenshots/")) == 2  # never deleted
    with pytest.raises(ServiceError) as refused:
        await rig.ask(r.RecordEntry(subject_id=a, kind="action"))
    assert refused.value.status == 409


async def test_a_failed_subject_survives_its_close_until_the_pin_expires_then_reclaim_removes_it(
        rig: Rig) -> None:
    sid = "sess-" + uuid.uuid4().hex[:8]
    screen = png(40, 30, (9, 9, 9))
    await rig.ask(r.OpenSubject(subject_id=sid, team_id="t"))
    await rig.ask(r.RecordEntry(subject_id=sid, kind="failure", summary={"error": "boom"},
                                screenshot_png=screen))
    failed = await rig.ask(r.MarkFailed(subject_id=sid, reason="bridge failed", retain_s=2))
    assert failed.summary.retention == "temporary_postmortem_pin"
    assert failed.summary.postmortem_retained_until is not None
    closed = await rig.ask(r.CloseSubject(subject_id=sid))
    assert closed.summary.mode == "sparse_timeline" and closed.summary.event_count == 1
    assert closed.summary.status == "idle"
    report = await rig.ask(r.Reclaim(mode="report"))
    assert not [c for c in report.candidates if sid in c.path]  # still pinned
    await trio.sleep(2.5)
    report = await rig.ask(r.Reclaim(mode="report"))
    mine = [c for c in report.candidates if sid in c.path]
    assert [(c.kind, c.tier) for c in mine] == [("expired_postmortem_pin", "runtime")]
    assert mine[0].bytes >= len(screen)
    applied = await rig.ask(r.Reclaim(mode="apply"))
    assert applied.candidates == report.candidates and applied.reclaimed == report.candidates
    summary = (await rig.ask(r.GetSummary(subject_id=sid))).summary
    assert summary.mode == "unavailable" and "expired" in summary.reason
    assert rig.objects("recorder/blobs/") == {}
    assert (await rig.ask(r.Reclaim(mode="report"))).candidates == []


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old))


async def test_reclaim_report_then_apply_removes_exactly_the_reported_candidates(rig: Rig) -> None:
    images, xvfb = rig.root / "images", rig.root / "xvfb" / "sessions"
    for name, age in (("guest-aaaa", 7200.0), ("guest-bbbb", 7000.0), ("guest-cccc", 10.0),
                      ("guest-dddd", 9000.0)):
        (images / name).mkdir()
        (images / name / "manifest.json").write_text("{}")
        (images / name / "rootfs.qcow2").write_bytes(b"x" * 1000)
        _age(images / name, age)
    # guest-dddd backs an overlay of this data directory: kept
    overlay = rig.root / "data" / "capsules" / "c1"
    overlay.mkdir(parents=True)
    backing = str(images / "guest-dddd" / "rootfs.qcow2").encode()
    header = b"QFI\xfb" + (3).to_bytes(4, "big") + (72).to_bytes(8, "big") + len(backing).to_bytes(4, "big")
    (overlay / "disk.qcow2").write_bytes(header.ljust(72, b"\0") + backing)
    (images / ".build-eeee-x1").mkdir()
    _age(images / ".build-eeee-x1", 7200)
    for name in ("old-session", "busy-session", "new-session"):
        (xvfb / name).mkdir(parents=True)
    _age(xvfb / "old-session", 7200)
    _age(xvfb / "busy-session", 7200)
    busy = subprocess.Popen(["sleep", "60"], cwd=xvfb / "busy-session")  # noqa: ASYNC220
    try:
        # an orphaned screenshot: a blob object no record knows
        rig.s3.put_object(Bucket=rig.bucket, Key="recorder/blobs/ab/" + "ab" * 32, Body=b"\x89PNG")
        report = await rig.ask(r.Reclaim(mode="report"))
        got = {(Path(c.path).name, c.tier, c.kind) for c in report.candidates}
        assert got == {("guest-aaaa", "cache", "guest_image"), ("guest-bbbb", "cache", "guest_image"),
                       (".build-eeee-x1", "legacy_build", "image_build_workdir"),
                       ("old-session", "runtime", "stale_runtime_dir"),
                       ("ab" * 32, "runtime", "orphaned_screenshot")}, got
        assert report.candidate_count == 5 and report.reclaimed == []
        assert report.cache_root == str(images) and report.exports_root == f"s3://{rig.bucket}/exports"
        assert any("shared" in x for x in report.limitations)
        assert (images / "guest-aaaa").exists()  # a report removes nothing
        applied = await rig.ask(r.Reclaim(mode="apply"))
        assert applied.candidates == report.candidates and applied.reclaimed == report.candidates
        for c in report.candidates:
            if c.path.startswith("/"):
                assert not os.path.exists(c.path)  # noqa: ASYNC240
        for kept in (images / "guest-cccc", images / "guest-dddd", xvfb / "busy-session",
                     xvfb / "new-session", overlay / "disk.qcow2"):
            assert kept.exists(), kept
        assert rig.objects("recorder/blobs/") == {}
        assert (await rig.ask(r.Reclaim(mode="report"))).candidates == []
    finally:
        busy.kill()
        busy.wait()
