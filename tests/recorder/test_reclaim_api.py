"""``POST /api/storage/reclaim`` over real HTTP against ``dovecote up`` (its own image cache and
runtime roots in a temp directory, so ``apply`` cannot touch anything else on the machine)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.accounts.helpers import Browser, signed_up_user
from tests.helpers.suite import Suite
from tests.helpers.users import create_admin


class World:
    suite: Suite
    root: Path
    admin: Browser


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="dcrecl-", dir="/tmp"))
    w = World()
    w.root = root
    (root / "images").mkdir()
    (root / "xvfb" / "sessions").mkdir(parents=True)
    w.suite = Suite(extra_env={"DOVECOTE_SIGNUP_MAX_PER_IP": "100000",
                               "DOVECOTE_VM_IMAGE_DIR": str(root / "images"),
                               "DOVECOTE_DESKTOP_XVFB_ROOT": str(root / "xvfb"),
                               "DOVECOTE_RECORDER_RECLAIM_STALE_S": "60"})
    try:
        w.suite.wait_ready()
        w.admin, _ = create_admin(w.suite)
        yield w
    finally:
        w.suite.stop()
        shutil.rmtree(root, ignore_errors=True)


def _stale(path: Path) -> None:
    old = time.time() - 3600
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old))


def test_only_platform_admins_reclaim_and_bad_modes_are_400(world: World) -> None:
    assert httpx.post(world.suite.url + "/api/storage/reclaim", json={"mode": "report"}).status_code == 401
    user, _, _ = signed_up_user(world.suite, "Ana")
    assert user.post("/api/storage/reclaim", {"mode": "report"}).status_code == 403
    key = user.post("/v1/api-keys", {"name": "k"}).json()["key"]
    keyed = httpx.post(world.suite.url + "/api/storage/reclaim", json={"mode": "report"},
                       headers={"X-API-Key": key})
    assert keyed.status_code == 403
    for body in ({"mode": "everything"}, {"mode": "report", "extra": 1}, [1]):
        bad = world.admin.post("/api/storage/reclaim", body)
        assert bad.status_code == 400, (body, bad.text)


def test_report_then_apply_removes_exactly_what_was_reported(world: World) -> None:
    images = world.root / "images"
    for name in ("guest-0001", "guest-0002"):
        (images / name).mkdir()
        (images / name / "manifest.json").write_text("{}")
    _stale(images / "guest-0001")
    (world.root / "xvfb" / "sessions" / "gone").mkdir()
    _stale(world.root / "xvfb" / "sessions" / "gone")
    report = world.admin.post("/api/storage/reclaim", {"mode": "report"})
    assert report.status_code == 200, report.text
    body = report.json()
    for key in ("mode", "runtime_root", "cache_root", "exports_root", "legacy_build_root",
                "candidate_count", "candidates", "reclaimed", "limitations"):
        assert key in body, key
    assert body["mode"] == "report" and body["reclaimed"] == [] and body["limitations"]
    assert body["cache_root"] == str(images)
    paths = {c["path"]: (c["tier"], c["kind"]) for c in body["candidates"]}
    assert paths == {str(images / "guest-0001"): ("cache", "guest_image"),
                     str(world.root / "xvfb" / "sessions" / "gone"): ("runtime", "stale_runtime_dir")}
    assert body["candidate_count"] == 2 and all(c["reason"] for c in body["candidates"])
    applied = world.admin.post("/api/storage/reclaim", {"mode": "apply"}).json()
    assert applied["mode"] == "apply"
    assert applied["reclaimed"] == applied["candidates"] == body["candidates"]
    assert not (images / "guest-0001").exists() and not (world.root / "xvfb" / "sessions" / "gone").exists()
    assert (images / "guest-0002").exists()  # the newest image stays
    assert world.admin.post("/api/storage/reclaim", {}).json()["candidates"] == []
