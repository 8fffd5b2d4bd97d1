"""S3 (MinIO in production, SeaweedFS locally) for batch jobs, through the `minio` SDK.

The SDK is synchronous; each call runs in a thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from tensorway.batch.domain import ObjectRef

T = TypeVar("T")
READ_CHUNK_BYTES = 4 * 1024 * 1024


class StorageError(Exception):
    """An object could not be read or written; the message says why in words a job's owner understands."""


def _describe(ref: ObjectRef, exc: BaseException) -> str:
    if isinstance(exc, ValueError):
        # The SDK's own refusal of a bucket name or key it will not send.
        return f"{ref.uri} is not a usable object name: {exc}"
    if isinstance(exc, S3Error):
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            return f"{ref.uri} does not exist"
        if exc.code == "NoSuchBucket":
            return f"bucket {ref.bucket!r} of {ref.uri} does not exist"
        if exc.code == "AccessDenied":
            return f"access to {ref.uri} is denied"
        return f"{ref.uri}: {exc.code}: {exc.message}"
    return f"{ref.uri} is unreachable: {exc}"


class RangedObject(io.RawIOBase):
    """A read-only, seekable file over one object: each read is one ranged GET. For use in a
    worker thread (ObjectStore.with_file); a failed read raises StorageError."""

    def __init__(self, client: Minio, ref: ObjectRef, size: int) -> None:
        super().__init__()
        self._client = client
        self._ref = ref
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._position + size)
        if end <= self._position:
            return b""
        try:
            response = self._client.get_object(
                self._ref.bucket, self._ref.key, offset=self._position, length=end - self._position
            )
            try:
                data: bytes = response.read()
            finally:
                response.close()
                response.release_conn()
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise StorageError(_describe(self._ref, exc)) from exc
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ObjectStore:
    """Reads, writes and presigns objects."""

    def __init__(self, client: Minio) -> None:
        self._client = client

    @classmethod
    def connect(
        cls, endpoint: str, access_key: str, secret_key: str, region: str, max_connections: int = 32
    ) -> ObjectStore:
        """`endpoint` is `http(s)://host:port`. A fixed region keeps presigning offline."""
        parts = urlsplit(endpoint)
        http = urllib3.PoolManager(
            maxsize=max_connections,
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        )
        client = Minio(
            parts.netloc,
            access_key=access_key,
            secret_key=secret_key,
            secure=parts.scheme == "https",
            region=region,
            http_client=http,
        )
        return cls(client)

    async def _run(self, ref: ObjectRef, call: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(call)
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise StorageError(_describe(ref, exc)) from exc

    async def read(self, ref: ObjectRef, offset: int = 0, length: int = 0) -> bytes:
        """The object's bytes, or `length` of them from `offset` (0: to the end)."""

        def call() -> bytes:
            response = self._client.get_object(ref.bucket, ref.key, offset=offset, length=length)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return await self._run(ref, call)

    async def size(self, ref: ObjectRef) -> int:
        def call() -> int:
            size: int = self._client.stat_object(ref.bucket, ref.key).size or 0
            return size

        return await self._run(ref, call)

    async def scan(self, ref: ObjectRef, consume: Callable[[Iterator[bytes]], T]) -> T:
        """Stream the object through `consume` in a worker thread, so a large one is never held whole."""

        def call() -> T:
            response = self._client.get_object(ref.bucket, ref.key)
            try:
                return consume(response.stream(READ_CHUNK_BYTES))
            finally:
                response.close()
                response.release_conn()

        return await self._run(ref, call)

    async def list(self, prefix: ObjectRef) -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix`, at any depth, in key order."""

        def call() -> list[tuple[str, int]]:
            listed = self._client.list_objects(prefix.bucket, prefix=prefix.key, recursive=True)
            return sorted((o.object_name, int(o.size or 0)) for o in listed if not o.is_dir)

        return await self._run(prefix, call)

    async def with_file(self, ref: ObjectRef, size: int, consume: Callable[[RangedObject], T]) -> T:
        """Run `consume` in a worker thread on a seekable view of the object (of `size` bytes)
        whose reads are ranged GETs, so a reader that seeks (Parquet's) fetches only what it
        reads, never the whole object."""
        return await self._run(ref, lambda: consume(RangedObject(self._client, ref, size)))

    async def write(self, ref: ObjectRef, data: bytes, content_type: str) -> str:
        """Store `data` at `ref` (replacing what was there); returns its SHA-256, hex."""

        def call() -> str:
            self._client.put_object(
                ref.bucket, ref.key, io.BytesIO(data), len(data), content_type=content_type
            )
            # Hashed in the thread too: a part's megabytes would hold up the event loop.
            return hashlib.sha256(data).hexdigest()

        return await self._run(ref, call)

    async def delete(self, ref: ObjectRef) -> None:
        await self._run(ref, lambda: self._client.remove_object(ref.bucket, ref.key))

    async def ensure_bucket(self, bucket: str) -> None:
        ref = ObjectRef(bucket, "")

        def call() -> None:
            if not self._client.bucket_exists(bucket):
                self._client.make_bucket(bucket)

        await self._run(ref, call)

    def presign_upload(self, ref: ObjectRef, expiry: timedelta) -> str:
        """A PUT URL that stores one object at `ref`, without credentials, until `expiry` passes.

        One PUT takes up to 5 GiB (S3's limit); the API refuses larger uploads rather than
        presigning multipart ones, which SeaweedFS and the SDK make awkward to hand out."""
        url: str = self._client.presigned_put_object(ref.bucket, ref.key, expires=expiry)
        return url

    def presign(self, uri: str, expiry: timedelta) -> str:
        """A GET URL for the object that works without credentials until `expiry` passes."""
        ref = ObjectRef.parse(uri)
        url: str = self._client.presigned_get_object(ref.bucket, ref.key, expires=expiry)
        return url
