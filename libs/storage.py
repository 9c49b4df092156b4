"""Object storage behind one interface: the local filesystem, or S3 through boto3.

Services never import boto3: they get a :class:`Storage` from
:func:`storage_from_env` and use its async methods. Both backends pass the same
contract tests (``tests/libs/test_storage.py``).

Keys are ``/``-separated relative paths: 1..1024 UTF-8 bytes, no leading or
trailing ``/``, no empty, ``.`` or ``..`` segments, no backslashes or control
characters, and the first segment may not be ``.dovecote`` (reserved for the
filesystem backend's temp files and signing key). Invalid keys raise
:class:`~dovecote.libs.errors.StorageError` on both backends, so code that
works against the filesystem in development works against S3 in production.
One divergence remains: on the filesystem ``a`` and ``a/b`` cannot both exist
(a file is not a directory); design keys hierarchically.

Memory stays bounded for any object size: :meth:`Storage.put` accepts an async
iterable of chunks (buffered into 1 MiB writes, or S3 multipart parts of
``part_size``), a file path, or bytes; :meth:`Storage.open_read` streams chunks
of at most ``chunk_size`` bytes::

    async with storage.open_read(key) as chunks:
        async for chunk in chunks:
            ...

All blocking work (file I/O, boto3 calls) runs in worker threads bounded by a
per-storage ``trio.CapacityLimiter``.

Presigned URLs:

- S3: boto3's SigV4 presigned URL for ``GET`` (``get_object``) or ``PUT``
  (``put_object``). If the S3 endpoint the services use is not the one clients
  can reach (docker: ``http://minio:9000`` vs ``http://localhost:9000``), set
  ``public_endpoint_url`` (env ``S3_PUBLIC_ENDPOINT_URL``) and URLs are signed
  for that host.
- Filesystem: a *relative* URL ``/v1/storage/<quoted key>?expires=<unix>&sig=<sig>``
  (``&method=PUT`` for uploads), where ``sig`` is base64url(HMAC-SHA256(secret,
  ``"<METHOD>\\n<key>\\n<expires>"``)). Whoever serves the route calls
  :meth:`FilesystemStorage.verify_presigned` first; the gateway serves ``GET``
  only (``GET /v1/storage/<key>`` in ``gateway/routes/recorder.py``, streaming
  :meth:`Storage.open_read`), so a ``PUT`` URL is for a caller with the storage
  root at hand. The secret is ``signing_key`` if given (env
  ``STORAGE_SIGNING_KEY``), else 32 random bytes created once in
  ``<root>/.dovecote/presign.key`` (mode 0600), so every process sharing the
  storage root — recorder signing, gateway verifying — agrees without
  configuration. ``url_base`` may be an absolute URL (``http://host:8080/v1/storage``).

The filesystem backend writes atomically (temp file in ``<root>/.dovecote/tmp``,
fsync, rename), stores each object's SHA-256 and content type as extended
attributes of the file (``user.dovecote.*``; recomputed/guessed when the
filesystem lacks xattrs) and uses the SHA-256 as the ETag. S3's ETag is
whatever S3 reports (MD5 or the multipart form). Compare ETags only within
one backend.
"""

from __future__ import annotations

import abc
import base64
import builtins
import contextlib
import datetime as dt
import hashlib
import hmac
import mimetypes
import os
import secrets
import tempfile
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeAlias, TypeVar
from urllib.parse import quote

import trio

from .errors import NotFoundInStorage, StorageError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FilesystemStorage",
    "ObjectInfo",
    "PutData",
    "S3Storage",
    "Storage",
    "sign_storage_path",
    "storage_from_env",
    "validate_key",
    "verify_storage_signature",
]

T = TypeVar("T")

DEFAULT_CHUNK_SIZE = 1024 * 1024
_WRITE_BUFFER = 1024 * 1024
_MAX_KEY_BYTES = 1024
_RESERVED = ".dovecote"
_XATTR_SHA256 = "user.dovecote.sha256"
_XATTR_TYPE = "user.dovecote.content_type"
_METHODS = ("GET", "PUT")

PutData: TypeAlias = bytes | bytearray | memoryview | AsyncIterable[bytes] | os.PathLike[str]
"""What :meth:`Storage.put` accepts. A plain ``str`` is rejected (path or text?)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Metadata of one stored object.

    Attributes:
        key: the object's key.
        size: size in bytes.
        etag: opaque content token; SHA-256 hex on the filesystem, S3's ETag on S3.
        modified: last modification time (timezone-aware, UTC).
    """

    key: str
    size: int
    etag: str
    modified: dt.datetime


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise StorageError."""
    if not isinstance(key, str) or not key:
        raise StorageError(f"invalid storage key {key!r}: must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise StorageError(f"invalid storage key: longer than {_MAX_KEY_BYTES} bytes")
    if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise StorageError(f"invalid storage key {key!r}: backslash or control character")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(
            f"invalid storage key {key!r}: absolute, trailing slash, or empty/./.. segment"
        )
    if parts[0] == _RESERVED:
        raise StorageError(f"invalid storage key {key!r}: {_RESERVED}/ is reserved")
    return key


def _validate_prefix(prefix: str) -> str:
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)


class Storage(abc.ABC):
    """The storage interface. All methods validate keys and raise StorageError subclasses."""

    @abc.abstractmethod
    async def put(self, key: str, data: PutData, content_type: str | None = None) -> ObjectInfo:
        """Store ``data`` under ``key`` (replacing any object there); return its metadata.

        ``data`` is bytes, an async iterable of bytes chunks (streamed with
        bounded memory), or a file path (``os.PathLike``). The object becomes
        visible atomically, only once complete.
        """

    @abc.abstractmethod
    async def get(self, key: str) -> bytes:
        """Return the whole object. Raises NotFoundInStorage. Prefer open_read for big objects."""

    @abc.abstractmethod
    def open_read(
        self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Open the object for streaming: ``async with s.open_read(k) as chunks: async for ...``.

        Raises NotFoundInStorage on entering the block (before any chunk), so an
        HTTP handler can still answer 404. Each chunk has at most ``chunk_size`` bytes.
        """

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Return the object's metadata. Raises NotFoundInStorage."""

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Return every object whose key starts with ``prefix`` (a string prefix), sorted by key."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete the object; deleting a missing key is not an error."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool:
        """Return True if an object is stored under ``key``."""

    @abc.abstractmethod
    async def presign(self, key: str, expires_s: int = 3600, method: str = "GET") -> str:
        """Return a URL that lets its holder ``GET`` (or ``PUT``) ``key`` for ``expires_s`` seconds.

        See the module docstring for the shape of the URL on each backend. The
        object does not need to exist (useful for ``PUT``).
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release clients and connection pools; the storage is unusable afterwards."""


class _ChunkIterator:
    """Async iterator over ``read(size)`` run in worker threads."""

    def __init__(
        self, read: Callable[[int], bytes], chunk_size: int, limiter: trio.CapacityLimiter
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._read = read
        self._size = chunk_size
        self._limiter = limiter

    def __aiter__(self) -> _ChunkIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await trio.to_thread.run_sync(self._read, self._size, limiter=self._limiter)
        if not chunk:
            raise StopAsyncIteration
        return chunk


async def _buffered(data: AsyncIterable[bytes], size: int) -> AsyncGenerator[bytes, None]:
    """Re-chunk ``data`` into blocks of exactly ``size`` bytes (the last may be shorter)."""
    buf = bytearray()
    async for chunk in data:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"put() stream yielded {type(chunk).__name__}, expected bytes")
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def _check_data(data: object) -> None:
    if isinstance(data, str):
        raise TypeError("put() takes bytes, an async iterable of bytes, or a Path; not str")
    if not isinstance(data, (bytes, bytearray, memoryview, os.PathLike)) and not hasattr(
        data, "__aiter__"
    ):
        raise TypeError(f"put() cannot store {type(data).__name__}")


# --- signing (filesystem presigned URLs) ---------------------------------------


def _signature(secret: bytes, method: str, key: str, expires: int) -> str:
    mac = hmac.new(secret, f"{method}\n{key}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def sign_storage_path(
    secret: bytes, key: str, expires: int, method: str = "GET", url_base: str = "/v1/storage"
) -> str:
    """Return the signed URL for ``key`` valid until the unix time ``expires``."""
    method = method.upper()
    if method not in _METHODS:
        raise ValueError(f"unsupported presign method {method!r}")
    url = (
        f"{url_base.rstrip('/')}/{quote(validate_key(key), safe='/')}"
        f"?expires={expires}&sig={_signature(secret, method, key, expires)}"
    )
    return url if method == "GET" else f"{url}&method={method}"


def verify_storage_signature(
    secret: bytes,
    key: str,
    expires: int | str,
    sig: str,
    method: str = "GET",
    now: float | None = None,
) -> bool:
    """Return True if ``sig`` is valid for (method, key, expires) and not expired."""
    try:
        exp = int(expires)
        validate_key(key)
    except (ValueError, TypeError, StorageError):
        return False
    if exp < (time.time() if now is None else now):
        return False
    expected = _signature(secret, method.upper(), key, exp)
    return hmac.compare_digest(expected, sig)


# --- filesystem ----------------------------------------------------------------


class FilesystemStorage(Storage):
    """Objects as files under ``root`` (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        signing_key: bytes | None = None,
        url_base: str = "/v1/storage",
        max_threads: int = 16,
    ) -> None:
        self.root = Path(root).absolute()
        self.url_base = url_base
        self._tmp = self.root / _RESERVED / "tmp"
        self._secret = signing_key
        self._limiter = trio.CapacityLimiter(max_threads)
        self._ready = False

    def __repr__(self) -> str:
        return f"FilesystemStorage({str(self.root)!r})"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._ready:
            await trio.to_thread.run_sync(self._setup, limiter=self._limiter)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _setup(self) -> None:
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            if self._secret is None:
                self._secret = self._load_or_create_secret()
        except OSError as exc:
            raise StorageError(f"cannot prepare storage root {self.root}: {exc}") from exc
        self._ready = True

    def _load_or_create_secret(self) -> bytes:
        path = self.root / _RESERVED / "presign.key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            for _ in range(50):  # another process may be writing it right now
                data = path.read_bytes()
                if len(data) == 32:
                    return data
                time.sleep(0.01)
            raise StorageError(f"corrupt signing key file {path}") from None
        secret = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        return secret

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        return path

    # -- blocking helpers (worker threads) --

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        try:
            etag = os.getxattr(path, _XATTR_SHA256).decode()
        except OSError:
            etag = _sha256_file(path)
        return ObjectInfo(key=key, size=st.st_size, etag=etag, modified=_utc(st.st_mtime))

    def _stat_sync(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            if not path.is_file():
                raise NotFoundInStorage(key)
            return self._info(key, path)
        except FileNotFoundError as exc:
            raise NotFoundInStorage(key) from exc
        except OSError as exc:
            raise StorageError(f"cannot stat {key!r}: {exc}") from exc

    def _open_sync(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # closed by open_read
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise NotFoundInStorage(key) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key!r}: {exc}") from exc
        return f

    def _read_all(self, key: str) -> bytes:
        with self._open_sync(key) as f:
            return f.read()

    def _list_sync(self, prefix: str) -> builtins.list[ObjectInfo]:
        directory = prefix.rpartition("/")[0]
        start = self.root / directory if directory else self.root
        found: builtins.list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            if Path(dirpath) == self.root and _RESERVED in dirnames:
                dirnames.remove(_RESERVED)
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                if not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    found.append(self._info(key, Path(dirpath) / name))
        found.sort(key=lambda info: info.key)
        return found

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            return  # a "directory" is not an object
        except OSError as exc:
            raise StorageError(f"cannot delete {key!r}: {exc}") from exc
        parent = path.parent
        while parent != self.root:  # prune empty directories
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    # -- public API --

    async def put(self, key: str, data: PutData, content_type: str | None = None) -> ObjectInfo:
        validate_key(key)
        _check_data(data)
        writer = await self._run(_TempFile, self._tmp)
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                await self._run(writer.write, bytes(data))
            elif isinstance(data, os.PathLike):
                await self._run(writer.copy_from, Path(data))
            else:
                async with contextlib.aclosing(_buffered(data, _WRITE_BUFFER)) as blocks:
                    async for block in blocks:
                        await self._run(writer.write, block)
            ctype = content_type or mimetypes.guess_type(key)[0]
            await self._run(writer.commit, self._path(key), ctype)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(writer.discard)
            raise
        return await self._run(self._stat_sync, key)

    async def get(self, key: str) -> bytes:
        return await self._run(self._read_all, key)

    @contextlib.asynccontextmanager
    async def open_read(
        self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        f = await self._run(self._open_sync, key)
        try:
            yield _ChunkIterator(f.read, chunk_size, self._limiter)
        finally:
            f.close()

    async def stat(self, key: str) -> ObjectInfo:
        return await self._run(self._stat_sync, key)

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return await self._run(self._list_sync, _validate_prefix(prefix))

    async def delete(self, key: str) -> None:
        await self._run(self._delete_sync, key)

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        return await self._run(path.is_file)

    async def presign(self, key: str, expires_s: int = 3600, method: str = "GET") -> str:
        validate_key(key)
        if not self._ready:
            await self._run(lambda: None)
        assert self._secret is not None
        expires = int(time.time()) + int(expires_s)
        return sign_storage_path(self._secret, key, expires, method, self.url_base)

    def verify_presigned(
        self, key: str, *, expires: int | str, sig: str, method: str = "GET"
    ) -> bool:
        """Return True if a URL from :meth:`presign` is authentic and unexpired.

        The gateway passes the key from the URL path (unquoted) and the
        ``expires``, ``sig`` (and ``method``) query parameters. Call it after any
        storage operation or :meth:`presign` so the secret is loaded; before
        that, it loads the secret synchronously (a tiny file read).
        """
        if self._secret is None:
            self._setup()
        assert self._secret is not None
        return verify_storage_signature(self._secret, key, expires, sig, method)


class _TempFile:
    """A temp file being written; ``commit`` renames it into place (all blocking)."""

    def __init__(self, tmp_dir: Path) -> None:
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="put-")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)

    def copy_from(self, source: Path) -> None:
        try:
            with open(source, "rb") as f:
                while block := f.read(_WRITE_BUFFER):
                    self.write(block)
        except OSError as exc:
            raise StorageError(f"cannot read {source}: {exc}") from exc

    def commit(self, target: Path, content_type: str | None) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            with contextlib.suppress(OSError):  # filesystems without user xattrs
                os.setxattr(self.path, _XATTR_SHA256, self.hash.hexdigest().encode())
                if content_type:
                    os.setxattr(self.path, _XATTR_TYPE, content_type.encode())
            for attempt in range(3):
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(self.path, target)
                    return
                except FileNotFoundError:
                    if attempt == 2:  # a concurrent delete keeps pruning the directory
                        raise
        except OSError as exc:
            raise StorageError(f"cannot store {target.name!r}: {exc}") from exc

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_WRITE_BUFFER):
            digest.update(block)
    return digest.hexdigest()


# --- S3 ------------------------------------------------------------------------


class _Body(Protocol):
    def read(self, amt: int | None = None) -> bytes: ...
    def close(self) -> None: ...


class S3Storage(Storage):
    """Objects in one S3 bucket via boto3 (AWS, MinIO, moto, ...).

    Credentials come from the arguments, else boto3's usual chain
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
    profiles, instance roles). The boto3 client is created lazily in a worker
    thread on first use; with ``create_bucket=True`` the bucket is created then
    if it is missing. Streams of more than ``part_size`` bytes are uploaded as
    multipart uploads (aborted on error or cancellation), so memory use is one
    part.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        public_endpoint_url: str | None = None,
        create_bucket: bool = False,
        part_size: int = 8 * 1024 * 1024,
        max_threads: int = 16,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
    ) -> None:
        if part_size < 5 * 1024 * 1024:
            raise ValueError("S3 multipart parts must be at least 5 MiB")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region or "us-east-1"
        self.public_endpoint_url = public_endpoint_url
        self.create_bucket = create_bucket
        self.part_size = part_size
        self._max_threads = max_threads
        self._credentials = {
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
            "aws_session_token": aws_session_token,
        }
        self._limiter = trio.CapacityLimiter(max_threads)
        self._client: Any = None
        self._public_client: Any = None

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    # -- plumbing --

    def _make_client(self, endpoint_url: str | None) -> Any:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(region_name=self.region, **self._credentials)
        config = Config(
            signature_version="s3v4",
            max_pool_connections=self._max_threads,
            retries={"mode": "standard", "max_attempts": 3},
            # custom endpoints (MinIO, moto) rarely resolve bucket subdomains
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        return session.client("s3", endpoint_url=endpoint_url, config=config)

    def _setup(self) -> None:
        if self._client is not None:
            return
        with self._errors(None):
            client = self._make_client(self.endpoint_url)
            if self.create_bucket:
                self._ensure_bucket(client)
            self._public_client = (
                self._make_client(self.public_endpoint_url) if self.public_endpoint_url else client
            )
            self._client = client

    def _ensure_bucket(self, client: Any) -> None:
        from botocore.exceptions import ClientError

        try:
            client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    @contextlib.contextmanager
    def _errors(self, key: str | None) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = _error_code(exc)
            if key is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundInStorage(key) from exc
            raise StorageError(f"S3 {code or 'error'} on {key or self.bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 request failed on {key or self.bucket!r}: {exc}") from exc

    async def _call(self, key: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(client, *args, **kwargs)`` in a worker thread with error translation."""

        def work() -> T:
            self._setup()
            with self._errors(key):
                return fn(self._client, *args, **kwargs)

        return await trio.to_thread.run_sync(work, limiter=self._limiter)

    def _info_from_head(self, key: str, head: Mapping[str, Any]) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=int(head["ContentLength"]),
            etag=str(head["ETag"]).strip('"'),
            modified=head["LastModified"].astimezone(dt.UTC),
        )

    # -- public API --

    async def put(self, key: str, data: PutData, content_type: str | None = None) -> ObjectInfo:
        validate_key(key)
        _check_data(data)
        extra: dict[str, Any] = {}
        ctype = content_type or mimetypes.guess_type(key)[0]
        if ctype:
            extra["ContentType"] = ctype
        if isinstance(data, (bytes, bytearray, memoryview)):
            body = bytes(data)
            await self._call(
                key, lambda c: c.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
            )
        elif isinstance(data, os.PathLike):
            await self._call(key, self._upload_file, Path(data), key, extra)
        else:
            async with contextlib.aclosing(_buffered(data, self.part_size)) as blocks:
                await self._put_stream(key, blocks, extra)
        return await self.stat(key)

    def _upload_file(self, client: Any, path: Path, key: str, extra: dict[str, Any]) -> None:
        from boto3.s3.transfer import TransferConfig

        if not path.is_file():
            raise StorageError(f"cannot read {path}: not a file")
        config = TransferConfig(
            multipart_threshold=self.part_size, multipart_chunksize=self.part_size,
            max_concurrency=4,
        )
        client.upload_file(str(path), self.bucket, key, ExtraArgs=extra or None, Config=config)

    async def _put_stream(
        self, key: str, blocks: AsyncIterator[bytes], extra: dict[str, Any]
    ) -> None:
        first = await anext(blocks, None)
        second = await anext(blocks, None) if first is not None else None
        if first is None or second is None:  # fits in one request
            body = first or b""
            await self._call(
                key, lambda c: c.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
            )
            return
        created = await self._call(
            key, lambda c: c.create_multipart_upload(Bucket=self.bucket, Key=key, **extra)
        )
        upload_id = created["UploadId"]
        parts: builtins.list[dict[str, Any]] = []
        try:
            async def upload(number: int, block: bytes) -> None:
                response = await self._call(
                    key,
                    lambda c: c.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload_id,
                        PartNumber=number, Body=block,
                    ),
                )
                parts.append({"PartNumber": number, "ETag": response["ETag"]})

            await upload(1, first)
            await upload(2, second)
            number = 2
            async for block in blocks:
                number += 1
                await upload(number, block)
            await self._call(
                key,
                lambda c: c.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(StorageError):
                await self._call(
                    key,
                    lambda c: c.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    ),
                )
            raise

    async def get(self, key: str) -> bytes:
        validate_key(key)

        def read(client: Any) -> bytes:
            response = client.get_object(Bucket=self.bucket, Key=key)
            with contextlib.closing(response["Body"]) as body:
                return bytes(body.read())

        return await self._call(key, read)

    @contextlib.asynccontextmanager
    async def open_read(
        self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        validate_key(key)
        response = await self._call(key, lambda c: c.get_object(Bucket=self.bucket, Key=key))
        body: _Body = response["Body"]

        def read(size: int) -> bytes:
            with self._errors(key):
                return body.read(size)

        try:
            yield _ChunkIterator(read, chunk_size, self._limiter)
        finally:
            body.close()

    async def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        head = await self._call(key, lambda c: c.head_object(Bucket=self.bucket, Key=key))
        return self._info_from_head(key, head)

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        _validate_prefix(prefix)

        def list_all(client: Any) -> builtins.list[ObjectInfo]:
            found = []
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            key=item["Key"],
                            size=int(item["Size"]),
                            etag=str(item["ETag"]).strip('"'),
                            modified=item["LastModified"].astimezone(dt.UTC),
                        )
                    )
            found.sort(key=lambda info: info.key)
            return found

        return await self._call(None, list_all)

    async def delete(self, key: str) -> None:
        validate_key(key)
        await self._call(key, lambda c: c.delete_object(Bucket=self.bucket, Key=key))

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except NotFoundInStorage:
            return False
        return True

    async def presign(self, key: str, expires_s: int = 3600, method: str = "GET") -> str:
        validate_key(key)
        operation = {"GET": "get_object", "PUT": "put_object"}.get(method.upper())
        if operation is None:
            raise ValueError(f"unsupported presign method {method!r}")

        def sign(_: Any) -> str:
            return str(
                self._public_client.generate_presigned_url(
                    operation, Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_s)
                )
            )

        return await self._call(key, sign)

    async def aclose(self) -> None:
        clients = {id(c): c for c in (self._client, self._public_client) if c is not None}
        self._client = self._public_client = None
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.close()


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# --- configuration -------------------------------------------------------------


def _env_bool(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def storage_from_env(environ: Mapping[str, str], data_dir: Path) -> Storage:
    """Pick the storage backend from the environment.

    S3 when ``S3_BUCKET`` or ``S3_ENDPOINT_URL`` is set:

    - ``S3_BUCKET`` (default ``dovecote``), ``S3_ENDPOINT_URL`` (MinIO/moto/...),
      ``S3_PUBLIC_ENDPOINT_URL`` (host used in presigned URLs),
      ``AWS_REGION``/``AWS_DEFAULT_REGION`` (default ``us-east-1``),
      ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
      ``S3_CREATE_BUCKET`` (default: true when ``S3_ENDPOINT_URL`` is set).

    Otherwise the filesystem under ``data_dir/storage``, with
    ``STORAGE_SIGNING_KEY`` as the presign secret if set. Nothing is created or
    contacted until the first operation.
    """
    bucket = environ.get("S3_BUCKET", "").strip()
    endpoint = environ.get("S3_ENDPOINT_URL", "").strip()
    if bucket or endpoint:
        return S3Storage(
            bucket or "dovecote",
            endpoint_url=endpoint or None,
            region=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None,
            public_endpoint_url=environ.get("S3_PUBLIC_ENDPOINT_URL") or None,
            create_bucket=_env_bool(environ.get("S3_CREATE_BUCKET"), default=bool(endpoint)),
            aws_access_key_id=environ.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=environ.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_session_token=environ.get("AWS_SESSION_TOKEN") or None,
        )
    secret = environ.get("STORAGE_SIGNING_KEY")
    return FilesystemStorage(
        Path(data_dir) / "storage", signing_key=secret.encode() if secret else None
    )
