"""The storage contract, run against the filesystem and a real S3 endpoint (moto server)."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import trio

from dovecote.libs.errors import NotFoundInStorage, StorageError
from dovecote.libs.storage import (
    FilesystemStorage,
    S3Storage,
    Storage,
    storage_from_env,
    validate_key,
)

MiB = 1024 * 1024


async def test_put_get_stat_exists_delete(storage: Storage) -> None:
    with trio.fail_after(20):
        info = await storage.put("reviews/r1/review.json", b'{"ok": true}')
        assert info.key == "reviews/r1/review.json"
        assert info.size == 12
        assert info.etag
        assert info.modified.tzinfo is not None
        assert await storage.get("reviews/r1/review.json") == b'{"ok": true}'
        assert await storage.exists("reviews/r1/review.json")
        assert (await storage.stat("reviews/r1/review.json")).etag == info.etag

        replaced = await storage.put("reviews/r1/review.json", b"{}")
        assert await storage.get("reviews/r1/review.json") == b"{}"
        assert replaced.etag != info.etag

        await storage.delete("reviews/r1/review.json")
        assert not await storage.exists("reviews/r1/review.json")
        await storage.delete("reviews/r1/review.json")  # idempotent
        await storage.delete("never/existed")
        with pytest.raises(NotFoundInStorage) as missing:
            await storage.get("reviews/r1/review.json")
        assert missing.value.key == "reviews/r1/review.json"
        with pytest.raises(NotFoundInStorage):
            await storage.stat("reviews/r1/review.json")


async def test_same_content_gives_same_etag(storage: Storage) -> None:
    with trio.fail_after(20):
        a = await storage.put("a.png", b"same bytes")
        b = await storage.put("b.png", b"same bytes")
        c = await storage.put("c.png", b"other bytes")
        assert a.etag == b.etag != c.etag


async def test_list_by_prefix_is_sorted_and_complete(storage: Storage) -> None:
    with trio.fail_after(20):
        for key in ["r/2/b.txt", "r/1/a.txt", "r/1/sub/c.txt", "r10/x.txt", "other/y.txt"]:
            await storage.put(key, key.encode())
        assert [i.key for i in await storage.list("r/")] == [
            "r/1/a.txt",
            "r/1/sub/c.txt",
            "r/2/b.txt",
        ]
        # a string prefix, not a directory: "r" matches r/... and r10/...
        assert [i.key for i in await storage.list("r")] == [
            "r/1/a.txt",
            "r/1/sub/c.txt",
            "r/2/b.txt",
            "r10/x.txt",
        ]
        assert [i.key for i in await storage.list("r/1/a")] == ["r/1/a.txt"]
        everything = await storage.list()
        assert len(everything) == 5
        sizes = {i.key: i.size for i in everything}
        assert sizes["other/y.txt"] == len(b"other/y.txt")
        assert await storage.list("nothing/") == []


async def test_bad_keys_are_rejected(storage: Storage) -> None:
    bad = [
        "", "/etc/passwd", "../escape", "a/../../b", "a/./b", "a//b", "trailing/",
        "back\\slash", "nul\x00byte", ".dovecote/presign.key", "x" * 1025,
    ]
    with trio.fail_after(20):
        for key in bad:
            with pytest.raises(StorageError):
                await storage.put(key, b"x")
            with pytest.raises(StorageError):
                await storage.get(key)
            with pytest.raises(StorageError):
                await storage.delete(key)
            with pytest.raises(StorageError):
                await storage.presign(key)
        with pytest.raises(StorageError):
            await storage.list("../")
        with pytest.raises(TypeError):
            await storage.put("k", "a str is ambiguous")


async def test_large_object_streams_in_and_out_in_bounded_chunks(
    storage: Storage, tmp_path: Path
) -> None:
    size = 20 * MiB + 123
    pattern = hashlib.sha256(b"seed").digest() * (64 * 1024 // 32)  # 64 KiB
    expected = hashlib.sha256()

    async def produce() -> AsyncIterator[bytes]:
        sent = 0
        while sent < size:
            piece = pattern[: min(len(pattern), size - sent)]
            expected.update(piece)
            sent += len(piece)
            yield piece

    with trio.fail_after(120):
        info = await storage.put("big/blob.bin", produce(), content_type="application/octet-stream")
        assert info.size == size
        got = hashlib.sha256()
        total = 0
        largest = 0
        async with storage.open_read("big/blob.bin", chunk_size=256 * 1024) as chunks:
            async for chunk in chunks:
                got.update(chunk)
                total += len(chunk)
                largest = max(largest, len(chunk))
        assert total == size
        assert largest <= 256 * 1024
        assert got.hexdigest() == expected.hexdigest()

        # a file path streams too (multipart on S3 for > part_size)
        source = tmp_path / "upload.bin"
        source.write_bytes(os.urandom(6 * MiB))
        await storage.put("big/from-file.bin", source)
        assert await storage.get("big/from-file.bin") == source.read_bytes()


async def test_open_read_of_a_missing_key_raises_before_streaming(storage: Storage) -> None:
    with trio.fail_after(20), pytest.raises(NotFoundInStorage):
        async with storage.open_read("missing.bin"):
            pytest.fail("entered the block")


async def test_failed_stream_upload_leaves_no_object(storage: Storage) -> None:
    class Broken(Exception):
        pass

    async def produce() -> AsyncIterator[bytes]:
        yield b"x" * (6 * MiB)  # past one S3 part: a multipart upload is in flight
        raise Broken

    with trio.fail_after(30):
        with pytest.raises(Broken):
            await storage.put("partial.bin", produce())
        assert not await storage.exists("partial.bin")
        assert await storage.list() == []


async def test_presigned_get_url_downloads_the_object(storage: Storage) -> None:
    with trio.fail_after(20):
        await storage.put("shots/ab/cd.png", b"\x89PNG fake", content_type="image/png")
        url = await storage.presign("shots/ab/cd.png", expires_s=600)
        if isinstance(storage, S3Storage):

            def fetch() -> tuple[bytes, str]:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return response.read(), response.headers.get("Content-Type", "")

            body, content_type = await trio.to_thread.run_sync(fetch)
            assert body == b"\x89PNG fake"
            assert content_type == "image/png"
        else:
            assert isinstance(storage, FilesystemStorage)
            # what the gateway does with /v1/storage/{key}?expires=..&sig=..
            parts = urlsplit(url)
            assert parts.path.startswith("/v1/storage/")
            key = unquote(parts.path.removeprefix("/v1/storage/"))
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            assert storage.verify_presigned(key, expires=query["expires"], sig=query["sig"])
            assert not storage.verify_presigned(
                "shots/ab/other.png", expires=query["expires"], sig=query["sig"]
            )
            assert not storage.verify_presigned(
                key, expires=int(query["expires"]) + 1, sig=query["sig"]
            )
            assert not storage.verify_presigned(
                key, expires=query["expires"], sig=query["sig"], method="PUT"
            )
            async with storage.open_read(key) as chunks:
                assert b"".join([c async for c in chunks]) == b"\x89PNG fake"


async def test_presigned_put_url_uploads(storage: Storage) -> None:
    with trio.fail_after(20):
        url = await storage.presign("uploads/new.bin", method="PUT")
        if isinstance(storage, S3Storage):

            def upload() -> int:
                # an explicit type: urllib's default (form-urlencoded) makes moto eat the body
                request = urllib.request.Request(
                    url,
                    data=b"uploaded",
                    method="PUT",
                    headers={"Content-Type": "application/octet-stream"},
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)

            assert await trio.to_thread.run_sync(upload) == 200
            assert await storage.get("uploads/new.bin") == b"uploaded"
        else:
            assert isinstance(storage, FilesystemStorage)
            query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
            assert query["method"] == "PUT"
            assert storage.verify_presigned(
                "uploads/new.bin", expires=query["expires"], sig=query["sig"], method="PUT"
            )


async def test_filesystem_presign_secret_is_shared_through_the_root(tmp_path: Path) -> None:
    signer = FilesystemStorage(tmp_path / "s")
    url = await signer.presign("a/b.txt")
    verifier = FilesystemStorage(tmp_path / "s")  # e.g. the gateway process
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert verifier.verify_presigned("a/b.txt", expires=query["expires"], sig=query["sig"])
    stranger = FilesystemStorage(tmp_path / "other")
    assert not stranger.verify_presigned("a/b.txt", expires=query["expires"], sig=query["sig"])
    expired = await signer.presign("a/b.txt", expires_s=-1)
    query = {k: v[0] for k, v in parse_qs(urlsplit(expired).query).items()}
    assert not verifier.verify_presigned("a/b.txt", expires=query["expires"], sig=query["sig"])


async def test_filesystem_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    store = FilesystemStorage(tmp_path / "s")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(store.put, "same/key.bin", bytes([i]) * 100_000)
        data = await store.get("same/key.bin")
        assert len(data) == 100_000 and len(set(data)) == 1  # one whole write won
        assert list((tmp_path / "s" / ".dovecote" / "tmp").iterdir()) == []
        await store.delete("same/key.bin")
        assert not (tmp_path / "s" / "same").exists()  # empty directories pruned
        assert [i.key for i in await store.list()] == []


def test_validate_key_accepts_ordinary_keys() -> None:
    for key in ["a", "a/b/c.json", "screens/sha256/ab/abcdef.png", "with space/ü.txt", ".hidden"]:
        assert validate_key(key) == key


def test_storage_from_env_picks_the_backend(tmp_path: Path) -> None:
    fs = storage_from_env({}, tmp_path)
    assert isinstance(fs, FilesystemStorage)
    assert fs.root == tmp_path / "storage"
    s3 = storage_from_env(
        {"S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1"}, tmp_path
    )
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.region, s3.create_bucket) == ("dovecote", "eu-west-1", True)
    aws = storage_from_env({"S3_BUCKET": "prod-artifacts"}, tmp_path)
    assert isinstance(aws, S3Storage)
    assert (aws.bucket, aws.endpoint_url, aws.create_bucket) == ("prod-artifacts", None, False)


async def test_unreachable_s3_raises_storage_error() -> None:
    store = S3Storage(
        "b", endpoint_url="http://127.0.0.1:9", aws_access_key_id="x", aws_secret_access_key="y"
    )
    with trio.fail_after(60), pytest.raises(StorageError):
        await store.get("k")
    await store.aclose()
