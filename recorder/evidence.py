"""The recorder's handlers: timelines, content-addressed blobs, exports, retention, reclaim.

Storage layout (one :class:`~dovecote.libs.storage.Storage`, filesystem or S3):

- runtime tier ``recorder/blobs/<sha[:2]>/<sha256>``: each distinct screenshot
  or artifact once, whatever the number of entries or subjects referring to it
  (``subject_blobs`` holds the references: an unchanged screen costs one row);
- exports tier ``exports/<subject>-review/``: ``review.json``,
  ``timeline.jsonl``, ``screenshots/<sha256>.png``, rewritten complete by each
  export except the screenshots already there (``exported_screens``), and
  ``exports/<subject>-review.zip`` made on demand for downloads. Dovecote never
  deletes anything under ``exports/``.

Blob writes and blob deletions hold one lock (a new reference never races a
reclaim of the same blob); exports of one subject run one at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import trio
from psycopg import Connection

from dovecote.bus.messages import recorder as r
from dovecote.libs.db import Database
from dovecote.libs.errors import NotFoundInStorage, ServiceError
from dovecote.libs.logs import get_logger
from dovecote.libs.storage import FilesystemStorage, S3Storage, Storage
from dovecote.libs.timefmt import rfc3339
from dovecote.recorder import reclaim as fs_reclaim
from dovecote.recorder.retention import compact, plan_subject, summarize, timeline_line

log = get_logger("dovecote.recorder")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_BLOB = 32 * 1024 * 1024
BLOB_PREFIX = "recorder/blobs/"
EXPORT_PREFIX = "exports/"
UPLOADS_IN_FLIGHT = 8
ORPHAN_OBJECT_GRACE_S = 600.0
"""A blob object with no row is only an orphan after this long (a write may be in flight)."""


class RecorderSettings(msgspec.Struct, kw_only=True, frozen=True):
    data_dir: str
    postmortem_s: float = 72 * 3600.0
    active_window_s: float = 60.0
    image_dir: str = ""
    xvfb_root: str = ""
    stale_s: float = 24 * 3600.0
    reclaim_images: bool = True
    orphan_grace_s: float = ORPHAN_OBJECT_GRACE_S


def blob_key(sha: str) -> str:
    return f"{BLOB_PREFIX}{sha[:2]}/{sha}"


def export_prefix(subject_id: str) -> str:
    return f"{EXPORT_PREFIX}{subject_id}-review"


def location(storage: Storage, key: str) -> str:
    """Where ``key`` lives, for people: an ``s3://`` URI or an absolute path."""
    if isinstance(storage, S3Storage):
        return f"s3://{storage.bucket}/{key}"
    if isinstance(storage, FilesystemStorage):
        return str(storage.root / key)
    return key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _not_found(subject_id: str) -> ServiceError:
    return ServiceError(404, "not_found", f"no evidence is recorded for {subject_id}")


class Recorder:
    """Handlers of :data:`~dovecote.bus.messages.recorder.RecorderRequest`."""

    def __init__(self, db: Database, storage: Storage, settings: RecorderSettings) -> None:
        self.db = db
        self.storage = storage
        self.settings = settings
        self.blob_lock = trio.Lock()
        self._export_locks: dict[str, trio.Lock] = {}

    def register(self, handle: Callable[[type, Any], None]) -> None:
        for message, handler in (
                (r.OpenSubject, self.open), (r.RecordEntry, self.record),
                (r.PutArtifact, self.put_artifact), (r.MarkFailed, self.mark_failed),
                (r.CloseSubject, self.close), (r.GetSummary, self.get_summary),
                (r.ExportBundle, self.export), (r.GetBundle, self.get_bundle),
                (r.Reclaim, self.reclaim)):
            handle(message, handler)

    # -- reading ----------------------------------------------------------------------------

    async def _subject(self, subject_id: str, team_id: str | None = None) -> dict[str, Any]:
        row = await self.db.fetchone("SELECT * FROM subjects WHERE id = %s", (subject_id,))
        if row is None or (team_id is not None and row["team_id"] != team_id):
            raise _not_found(subject_id)
        return row

    async def summary_of(self, row: dict[str, Any]) -> r.ReviewSummary:
        stats = await self.db.fetchone(
            "SELECT count(*) AS n, coalesce(sum(b.size), 0) AS bytes FROM blobs b "
            "WHERE b.sha256 IN (SELECT DISTINCT screenshot_sha256 FROM entries "
            "                   WHERE subject_id = %s AND screenshot_sha256 IS NOT NULL)",
            (row["id"],))
        assert stats is not None
        bundle = None
        if row["export_generation"]:
            bundle = r.BundleRef(kind="review_bundle",
                                 path=location(self.storage, export_prefix(row["id"])))
        return summarize(row, screenshot_count=int(stats["n"]), screenshot_bytes=int(stats["bytes"]),
                         exported_bundle=bundle, now=_now(),
                         active_window_s=self.settings.active_window_s)

    async def _reply(self, subject_id: str) -> r.SummaryReply:
        row = await self._subject(subject_id)
        return r.SummaryReply(subject_id=subject_id, summary=await self.summary_of(row))

    async def get_summary(self, msg: r.GetSummary) -> r.SummaryReply:
        row = await self._subject(msg.subject_id, msg.team_id)
        return r.SummaryReply(subject_id=msg.subject_id, summary=await self.summary_of(row))

    # -- recording --------------------------------------------------------------------------

    async def open(self, msg: r.OpenSubject) -> r.SummaryReply:
        await self.db.execute(
            "INSERT INTO subjects (id, kind, team_id, meta) VALUES (%s, %s, %s, %s::jsonb) "
            "ON CONFLICT (id) DO NOTHING",
            (msg.subject_id, msg.kind, msg.team_id, msgspec.json.encode(compact(msg.meta)).decode()))
        row = await self._subject(msg.subject_id)
        if row["team_id"] != msg.team_id or row["kind"] != msg.kind:
            raise ServiceError(409, "subject_exists", f"{msg.subject_id} belongs to another owner")
        return r.SummaryReply(subject_id=msg.subject_id, summary=await self.summary_of(row))

    async def _store_blob(self, data: bytes, mime_type: str) -> tuple[str, bool]:
        """Store ``data`` once (by SHA-256); True if it was new. Call with ``blob_lock``."""
        sha = hashlib.sha256(data).hexdigest()
        known = await self.db.fetchval("SELECT 1 FROM blobs WHERE sha256 = %s", (sha,))
        if known:
            return sha, False
        await self.storage.put(blob_key(sha), data, content_type=mime_type)
        await self.db.execute(
            "INSERT INTO blobs (sha256, key, size, mime_type) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (sha256) DO NOTHING", (sha, blob_key(sha), len(data), mime_type))
        return sha, True

    async def record(self, msg: r.RecordEntry) -> r.EntryRecorded:
        png = msg.screenshot_png
        if png is not None and (not png.startswith(PNG_MAGIC) or len(png) > MAX_BLOB):
            raise ServiceError(400, "invalid_screenshot", "screenshot_png must be a PNG of at most 32 MiB")
        try:
            at = dt.datetime.fromisoformat(msg.at.replace("Z", "+00:00")) if msg.at else _now()
        except ValueError:
            raise ServiceError(400, "invalid_request", "at must be an RFC 3339 timestamp") from None
        if at.tzinfo is None:
            at = at.replace(tzinfo=dt.UTC)
        summary = compact(msg.summary)
        row = await self._subject(msg.subject_id)
        if row["state"] != "open":
            raise ServiceError(409, "subject_closed", f"{msg.subject_id} is {row['state']}")
        async with self.blob_lock:
            sha, new = (await self._store_blob(png, "image/png")) if png is not None else (None, False)

            def append(conn: Connection[Any]) -> int:
                cur = conn.execute(
                    "UPDATE subjects SET last_seq = last_seq + 1, "
                    "  last_captured_at = greatest(coalesce(last_captured_at, %s), %s) "
                    "WHERE id = %s AND state = 'open' RETURNING last_seq",
                    (at, at, msg.subject_id))
                got = cur.fetchone()
                if got is None:
                    raise ServiceError(409, "subject_closed", f"{msg.subject_id} is closed")
                seq = int(got["last_seq"])
                size = len(timeline_line({"seq": seq, "at": at, "kind": msg.kind, "actor": msg.actor,
                                          "summary": summary, "screenshot_sha256": sha}))
                conn.execute(
                    "INSERT INTO entries (subject_id, seq, at, kind, actor, summary, screenshot_sha256) "
                    "VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s)",
                    (msg.subject_id, seq, at, msg.kind, msg.actor[:200],
                     msgspec.json.encode(summary).decode(), sha))
                conn.execute("UPDATE subjects SET entry_bytes = entry_bytes + %s WHERE id = %s",
                             (size, msg.subject_id))
                if sha is not None:
                    conn.execute("INSERT INTO subject_blobs (subject_id, sha256) VALUES (%s, %s) "
                                 "ON CONFLICT DO NOTHING", (msg.subject_id, sha))
                return seq

            seq = await self.db.transaction(append)
        return r.EntryRecorded(seq=seq, screenshot_sha256=sha, screenshot_new=new)

    async def put_artifact(self, msg: r.PutArtifact) -> r.ArtifactStored:
        if len(msg.data) > MAX_BLOB:
            raise ServiceError(413, "too_large", "an artifact is at most 32 MiB")
        row = await self._subject(msg.subject_id)
        if row["state"] != "open":
            raise ServiceError(409, "subject_closed", f"{msg.subject_id} is {row['state']}")
        async with self.blob_lock:
            sha, _ = await self._store_blob(msg.data, msg.mime_type)

            def attach(conn: Connection[Any]) -> None:
                conn.execute(
                    "INSERT INTO artifacts (subject_id, name, kind, mime_type, sha256, size) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (subject_id, name) DO UPDATE SET "
                    "kind = excluded.kind, mime_type = excluded.mime_type, sha256 = excluded.sha256, "
                    "size = excluded.size",
                    (msg.subject_id, msg.name, msg.kind, msg.mime_type, sha, len(msg.data)))
                conn.execute("INSERT INTO subject_blobs (subject_id, sha256) VALUES (%s, %s) "
                             "ON CONFLICT DO NOTHING", (msg.subject_id, sha))

            await self.db.transaction(attach)
        return r.ArtifactStored(artifact=r.BundleRef(kind=msg.kind, path=location(
            self.storage, blob_key(sha)), mime_type=msg.mime_type), sha256=sha, size=len(msg.data))

    # -- retention ----------------------------------------------------------------------------

    async def mark_failed(self, msg: r.MarkFailed) -> r.SummaryReply:
        await self._subject(msg.subject_id)
        retain = float(msg.retain_s) if msg.retain_s else self.settings.postmortem_s
        await self.db.execute(
            "UPDATE subjects SET pinned_until = %s, failed_reason = %s WHERE id = %s "
            "AND state <> 'dropped'",
            (_now() + dt.timedelta(seconds=retain), msg.reason[:500] or "failed", msg.subject_id))
        return await self._reply(msg.subject_id)

    async def close(self, msg: r.CloseSubject) -> r.SummaryReply:
        row = await self._subject(msg.subject_id)
        if row["state"] == "open":
            await self.db.execute(
                "UPDATE subjects SET state = 'closed', closed_at = now() WHERE id = %s AND state = 'open'",
                (msg.subject_id,))
            row = await self._subject(msg.subject_id)
        plan = plan_subject(row["state"], row["pinned_until"], _now())
        if plan.decision == "drop":
            await self._drop(msg.subject_id, "deleted with its session (ephemeral_until_export)"
                             + ("; the exported bundle is kept" if row["export_generation"] else ""))
        return await self._reply(msg.subject_id)

    async def _drop(self, subject_id: str, reason: str) -> list[str]:
        """Delete a subject's runtime evidence and the blobs only it referred to."""
        async with self.blob_lock:
            def drop(conn: Connection[Any]) -> list[str]:
                shas = [row["sha256"] for row in conn.execute(
                    "DELETE FROM subject_blobs WHERE subject_id = %s RETURNING sha256", (subject_id,))]
                conn.execute("DELETE FROM entries WHERE subject_id = %s", (subject_id,))
                conn.execute("DELETE FROM artifacts WHERE subject_id = %s", (subject_id,))
                conn.execute(
                    "UPDATE subjects SET state = 'dropped', dropped_at = now(), drop_reason = %s, "
                    "  last_seq = 0, entry_bytes = 0 WHERE id = %s", (reason, subject_id))
                gone = conn.execute(
                    "DELETE FROM blobs b WHERE b.sha256 = ANY(%s) AND NOT EXISTS "
                    "(SELECT 1 FROM subject_blobs s WHERE s.sha256 = b.sha256) RETURNING key",
                    (shas,)).fetchall()
                return [row["key"] for row in gone]

            keys = await self.db.transaction(drop)
            for key in keys:
                await self.storage.delete(key)
        log.info("evidence dropped", extra={"subject_id": subject_id, "blobs": len(keys),
                                            "reason": reason})
        return keys

    # -- export -------------------------------------------------------------------------------

    def _lock(self, subject_id: str) -> trio.Lock:
        return self._export_locks.setdefault(subject_id, trio.Lock())

    async def export(self, msg: r.ExportBundle) -> r.ExportReply:
        async with self._lock(msg.subject_id):
            row = await self._subject(msg.subject_id, msg.team_id)
            if row["state"] == "dropped" or not row["last_seq"]:
                summary = await self.summary_of(row)
                summary.mode, summary.status, summary.exportable = "unavailable", "unavailable", False
                summary.reason = summary.reason or "nothing is recorded yet"
                raise ServiceError(409, "review_unavailable", summary.reason,
                                   details={"review_recording": msgspec.to_builtins(summary)})
            return await self._export(row)

    async def _export(self, row: dict[str, Any]) -> r.ExportReply:
        sid = row["id"]
        prefix = export_prefix(sid)
        entries = await self.db.fetchall(
            "SELECT * FROM entries WHERE subject_id = %s AND seq <= %s ORDER BY seq",
            (sid, row["last_seq"]))
        shas = sorted({e["screenshot_sha256"] for e in entries if e["screenshot_sha256"]})
        blobs = {b["sha256"]: b for b in await self.db.fetchall(
            "SELECT * FROM blobs WHERE sha256 = ANY(%s)", (shas,))}
        already = {x["sha256"] for x in await self.db.fetchall(
            "SELECT sha256 FROM exported_screens WHERE subject_id = %s", (sid,))}
        todo = [s for s in shas if s not in already]
        limiter = trio.CapacityLimiter(UPLOADS_IN_FLIGHT)

        async def copy(sha: str) -> None:
            async with limiter:
                data = await self.storage.get(blobs[sha]["key"])
                if hashlib.sha256(data).hexdigest() != sha:
                    raise ServiceError(500, "evidence_corrupt", f"screenshot {sha} does not match its hash")
                await self.storage.put(f"{prefix}/screenshots/{sha}.png", data, content_type="image/png")
                await self.db.execute("INSERT INTO exported_screens (subject_id, sha256) "
                                      "VALUES (%s, %s) ON CONFLICT DO NOTHING", (sid, sha))

        async with trio.open_nursery() as nursery:
            for sha in todo:
                nursery.start_soon(copy, sha)
        timeline = b"".join(timeline_line(e) for e in entries)
        generation = int(row["export_generation"]) + 1
        screenshots = [{"sha256": s, "size": int(blobs[s]["size"]), "file": f"screenshots/{s}.png"}
                       for s in shas]
        review = {
            "format": "dovecote.review_bundle/1", "subject": {"id": sid, "kind": row["kind"],
                                                             "meta": row["meta"]},
            "generation": generation, "exported_at": rfc3339(_now()),
            "created_at": rfc3339(row["created_at"]), "last_captured_at": rfc3339(row["last_captured_at"]),
            "event_count": len(entries), "screenshot_count": len(shas),
            "first_seq": entries[0]["seq"], "last_seq": entries[-1]["seq"],
            "retention": "temporary_postmortem_pin" if row["pinned_until"] else "ephemeral_until_export",
            "postmortem_retained_until": rfc3339(row["pinned_until"]),
            "failed_reason": row["failed_reason"],
            "timeline": {"file": "timeline.jsonl", "sha256": hashlib.sha256(timeline).hexdigest(),
                         "size": len(timeline)},
            "screenshots": screenshots,
        }
        review_bytes = msgspec.json.format(msgspec.json.encode(review), indent=2) + b"\n"
        await self.storage.put(f"{prefix}/timeline.jsonl", timeline, content_type="application/x-ndjson")
        await self.storage.put(f"{prefix}/review.json", review_bytes, content_type="application/json")
        files = [{"name": "review.json", "size": len(review_bytes),
                  "sha256": hashlib.sha256(review_bytes).hexdigest()},
                 {"name": "timeline.jsonl", "size": len(timeline), "sha256": review["timeline"]["sha256"]},
                 *({"name": s["file"], "size": s["size"], "sha256": s["sha256"]} for s in screenshots)]
        total = sum(int(f["size"]) for f in files)

        def commit(conn: Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO exports (subject_id, generation, prefix, last_seq, event_count, "
                "screenshot_count, bytes, uploaded, files) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)",
                (sid, generation, prefix, row["last_seq"], len(entries), len(shas), total,
                 len(todo) + 2, msgspec.json.encode(files).decode()))
            conn.execute("UPDATE subjects SET exported_seq = %s, export_generation = %s, "
                         "export_bytes = %s WHERE id = %s",
                         (row["last_seq"], generation, total, sid))

        await self.db.transaction(commit)
        log.info("review bundle exported", extra={"subject_id": sid, "generation": generation,
                                                  "uploaded": len(todo) + 2, "bytes": total})
        fresh = await self._subject(sid)
        return r.ExportReply(bundle=r.BundleRef(kind="review_bundle", path=location(self.storage, prefix)),
                             review_recording=await self.summary_of(fresh), uploaded=len(todo) + 2)

    async def get_bundle(self, msg: r.GetBundle) -> r.BundleLinks:
        async with self._lock(msg.subject_id):
            row = await self._subject(msg.subject_id, msg.team_id)
            generation = int(row["export_generation"])
            if not generation:
                raise ServiceError(404, "not_exported", f"{msg.subject_id} has no exported review bundle")
            export = await self.db.fetchone(
                "SELECT * FROM exports WHERE subject_id = %s AND generation = %s",
                (msg.subject_id, generation))
            assert export is not None
            prefix = export["prefix"]
            zip_key = f"{prefix}.zip"
            if int(row["zip_generation"]) < generation or not await self.storage.exists(zip_key):
                await self._write_zip(prefix, export["files"], zip_key)
                await self.db.execute("UPDATE subjects SET zip_generation = %s WHERE id = %s",
                                      (generation, msg.subject_id))
            files = [r.BundleFile(name=f["name"], size=int(f["size"]), sha256=f["sha256"],
                                  url=await self.storage.presign(f"{prefix}/{f['name']}", msg.expires_s))
                     for f in export["files"]]
            zip_url = await self.storage.presign(zip_key, msg.expires_s)
        return r.BundleLinks(bundle=r.BundleRef(kind="review_bundle", path=location(self.storage, prefix)),
                             generation=generation, files=files, zip_url=zip_url,
                             expires_in_s=msg.expires_s)

    async def _write_zip(self, prefix: str, files: list[dict[str, Any]], zip_key: str) -> None:
        spool = await trio.to_thread.run_sync(tempfile.TemporaryFile)
        try:
            archive = zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_STORED)
            name = prefix.rsplit("/", 1)[-1]
            for f in files:
                data = await self.storage.get(f"{prefix}/{f['name']}")
                await trio.to_thread.run_sync(archive.writestr, f"{name}/{f['name']}", data)
            await trio.to_thread.run_sync(archive.close)
            await trio.to_thread.run_sync(spool.seek, 0)
            data = await trio.to_thread.run_sync(spool.read)
            await self.storage.put(zip_key, data, content_type="application/zip")
        finally:
            spool.close()

    # -- reclaim ------------------------------------------------------------------------------

    def roots(self) -> dict[str, str]:
        image_dir = self.settings.image_dir or "(no image cache configured)"
        return {"runtime_root": location(self.storage, "recorder"),
                "cache_root": image_dir,
                "exports_root": location(self.storage, "exports"),
                "legacy_build_root": image_dir}

    async def candidates(self) -> list[r.ReclaimCandidate]:
        now = _now()
        found: list[r.ReclaimCandidate] = []
        for row in await self.db.fetchall(
                "SELECT s.id, s.state, s.pinned_until, "
                "  (SELECT coalesce(sum(b.size), 0) FROM subject_blobs sb JOIN blobs b USING (sha256) "
                "   WHERE sb.subject_id = s.id AND NOT EXISTS (SELECT 1 FROM subject_blobs o "
                "     WHERE o.sha256 = sb.sha256 AND o.subject_id <> s.id)) + s.entry_bytes AS bytes "
                "FROM subjects s WHERE s.state = 'closed' ORDER BY s.id"):
            plan = plan_subject(row["state"], row["pinned_until"], now)
            if plan.decision == "drop":
                found.append(r.ReclaimCandidate(
                    path=location(self.storage, f"recorder/subjects/{row['id']}"), tier="runtime",
                    kind=plan.kind, reason=plan.reason + " (its timeline, and the screenshots only "
                    "it refers to)", bytes=int(row["bytes"])))
        s = self.settings
        known = set()
        for row in await self.db.fetchall(
                "SELECT b.* FROM blobs b WHERE NOT EXISTS "
                "(SELECT 1 FROM subject_blobs s WHERE s.sha256 = b.sha256) ORDER BY b.key"):
            known.add(row["key"])
            found.append(r.ReclaimCandidate(
                path=location(self.storage, row["key"]), tier="runtime",
                kind="orphaned_screenshot" if row["mime_type"] == "image/png" else "orphaned_blob",
                reason="no subject refers to it", bytes=int(row["size"])))
        rows = {row["key"] for row in await self.db.fetchall("SELECT key FROM blobs")}
        for info in await self.storage.list(BLOB_PREFIX):
            if info.key not in rows and info.key not in known \
                    and (now - info.modified).total_seconds() >= s.orphan_grace_s:
                found.append(r.ReclaimCandidate(
                    path=location(self.storage, info.key), tier="runtime", kind="orphaned_screenshot",
                    reason="a stored object no blob record knows (an interrupted write)",
                    bytes=info.size))
        found.extend(await trio.to_thread.run_sync(lambda: fs_reclaim.scan(
            image_dir=Path(s.image_dir) if s.image_dir else None, data_dir=Path(s.data_dir).resolve(),
            xvfb_root=Path(s.xvfb_root) if s.xvfb_root else None, stale_s=s.stale_s,
            images=s.reclaim_images)))
        return found

    async def reclaim(self, msg: r.Reclaim) -> r.ReclaimReport:
        found = await self.candidates()
        reclaimed: list[r.ReclaimCandidate] = []
        if msg.mode == "apply":
            for candidate in found:
                if await self._apply(candidate):
                    reclaimed.append(candidate)
        limitations = list(fs_reclaim.LIMITATIONS)
        if not self.settings.image_dir:
            limitations.append("no guest image cache is configured (DOVECOTE_VM_IMAGE_DIR): "
                               "old images are not looked for")
        return r.ReclaimReport(mode=msg.mode, **self.roots(), candidate_count=len(found),
                               candidates=found, reclaimed=reclaimed, limitations=limitations)

    async def _apply(self, c: r.ReclaimCandidate) -> bool:
        subject_path = location(self.storage, "recorder/subjects/")
        blob_path = location(self.storage, BLOB_PREFIX)
        if c.path.startswith(subject_path):
            sid = c.path[len(subject_path):]
            row = await self.db.fetchone("SELECT * FROM subjects WHERE id = %s", (sid,))
            if row is None or plan_subject(row["state"], row["pinned_until"], _now()).decision != "drop":
                return False
            await self._drop(sid, c.reason)
            return True
        if c.path.startswith(blob_path):
            key = BLOB_PREFIX + c.path[len(blob_path):]
            async with self.blob_lock:
                gone = await self.db.fetchone(
                    "DELETE FROM blobs b WHERE key = %s AND NOT EXISTS "
                    "(SELECT 1 FROM subject_blobs s WHERE s.sha256 = b.sha256) RETURNING key", (key,))
                known = await self.db.fetchval("SELECT 1 FROM blobs WHERE key = %s", (key,))
                if gone is None and known:
                    return False  # referenced again meanwhile
                try:
                    await self.storage.delete(key)
                except NotFoundInStorage:
                    return False
            return True
        if os.path.isabs(c.path):
            return await trio.to_thread.run_sync(fs_reclaim.remove_dir, c.path)
        return False


def zip_names(data: bytes) -> list[str]:
    """The member names of a zip (tests and tools)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.namelist()
