"""The filesystem backend: bundles under ``<data_dir>/storage/exports`` and presigned downloads
served by the gateway (``/v1/storage/<key>?expires&sig``), with the recorder and the gateway
running in-process on the real bus and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from dovecote.bus import Broker, BusEndpoints, open_bus
from dovecote.bus.messages import recorder as r
from dovecote.gateway.service import SPEC as GATEWAY
from dovecote.libs.config import load_config
from dovecote.libs.runtime import serve_service
from dovecote.recorder.service import SPEC as RECORDER
from tests.recorder.helpers import png


class Rig:
    def __init__(self, bus: Any, url: str, root: Path) -> None:
        self.bus, self.url, self.root = bus, url, root

    async def ask(self, msg: Any) -> Any:
        return await self.bus.request("recorder", msg, timeout=30)

    async def get(self, path: str) -> tuple[int, bytes]:
        def fetch() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(self.url + path, timeout=10) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()
        return await trio.to_thread.run_sync(fetch)


@pytest.fixture
async def rig(endpoints: BusEndpoints, broker: Broker, postgres_url: str, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    for name in ("S3_ENDPOINT_URL", "S3_BUCKET", "STORAGE_SIGNING_KEY"):
        monkeypatch.delenv(name, raising=False)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS recorder CASCADE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
    env.update(endpoints.to_env())
    env.update({"DATABASE_URL": postgres_url, "DOVECOTE_DATA_DIR": str(tmp_path),
                "DOVECOTE_SHUTDOWN_GRACE_S": "5", "DOVECOTE_HTTP_PORT": "0",
                "DOVECOTE_VM_IMAGE_DIR": str(tmp_path / "images")})
    with trio.fail_after(120):
        async with open_bus(endpoints, "probe") as bus, trio.open_nursery() as nursery:
            rec = await nursery.start(lambda task_status: serve_service(
                RECORDER, load_config(RECORDER.config_cls, env), environ=env, task_status=task_status))
            gw = await nursery.start(lambda task_status: serve_service(
                GATEWAY, load_config(GATEWAY.config_cls, env), environ=env, task_status=task_status))
            url = "http://" + gw.health_details["listen"].split("//", 1)[1]
            yield Rig(bus, url, tmp_path)
            gw.stop()
            rec.stop()


async def test_filesystem_bundles_download_through_signed_gateway_urls(rig: Rig) -> None:
    sid = "sess-" + uuid.uuid4().hex[:8]
    screens = [png(48, 32, (1, 2, 3)), png(48, 32, (1, 2, 3)), png(48, 32, (9, 8, 7))]
    await rig.ask(r.OpenSubject(subject_id=sid, team_id="t"))
    for i, screen in enumerate(screens):
        await rig.ask(r.RecordEntry(subject_id=sid, kind="action", summary={"i": i}, screenshot_png=screen))
    exported = await rig.ask(r.ExportBundle(subject_id=sid, team_id="t"))
    bundle_dir = rig.root / "storage" / "exports" / f"{sid}-review"
    assert exported.bundle.path == str(bundle_dir.absolute())
    on_disk = sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file())
    assert on_disk == sorted(["review.json", "timeline.jsonl"] + [
        f"screenshots/{hashlib.sha256(s).hexdigest()}.png" for s in {*screens}])
    links = await rig.ask(r.GetBundle(subject_id=sid, team_id="t", expires_s=60))
    for f in links.files:
        assert f.url.startswith("/v1/storage/exports/") and "sig=" in f.url
        status, body = await rig.get(f.url)
        assert status == 200 and body == (bundle_dir / f.name).read_bytes()
        assert hashlib.sha256(body).hexdigest() == f.sha256
    status, body = await rig.get(links.zip_url)
    assert status == 200
    assert len(zipfile.ZipFile(io.BytesIO(body)).namelist()) == len(links.files)
    # a link is only good as signed: another key, a changed expiry or signature are refused
    url = links.files[0].url
    traversal = "/v1/storage/recorder/..%2F..%2Fetc%2Fpasswd?expires=1&sig=x"
    for bad in (url.replace("review.json", "timeline.jsonl"), url.replace("expires=", "expires=9"),
                url[:-3] + "AAA", url.split("?")[0], traversal):
        status, _ = await rig.get(bad)
        assert status in (403, 404), (bad, status)
