"""Blobs in a bucket of an object store (Cloud Storage, S3), whichever client speaks to it.

Keys are ``PREFIX/ab/<sha256>``, as in a local blob directory. A unary upload's blob is put
at its key at once (its digest is known). A stream's digest is known only at its end, so it
goes to a temporary object, ``PREFIX/incoming/<random>``, as a multipart (S3) or resumable
(Cloud Storage) upload sent part by part as the content arrives; once checked it is copied
to its key unless that exists, and the temporary object is removed. The parts are read back
from a local spool file, which also serves the checks that need the whole content: memory
holds one part at a time whatever the file's size. An upload that fails or is cancelled is
aborted, which leaves no object (Cloud Storage's emulator cannot cancel one, but an
unfinished upload is no object either).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

from ingest_service.blobstores.calls import StoreCalls
from ingest_service.blobstores.spool import Spool, clear_spools
from ingest_service.domain.blobs import Placement, StoredObject
from ingest_service.domain.observer import BlobStoreObserver
from ingest_service.errors import StorageUnavailable

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
READ_CHUNK_BYTES = 256 * 1024
INCOMING = "incoming"
# Calls in flight at once: each streamed upload has at most one.
MAX_THREADS = 32
_BLOB_KEY = re.compile(r"([0-9a-f]{2})/([0-9a-f]{64})")


class PartUpload(Protocol):
    """One multipart or resumable upload; every method blocks."""

    def send(self, part: bytes) -> None:
        """Send the next part (each but the last of the bucket's ``part_bytes``)."""

    def complete(self) -> None:
        """Make the object of the parts sent."""

    def abort(self) -> None:
        """Cancel the upload: no object is made."""


class Bucket(Protocol):
    """What the store needs of a client, keys relative to the store's prefix; every method
    blocks, each call bounded by the client's timeout."""

    # The size of each part of an upload but the last; memory holds about one (or a few
    # copies of one, as the client sends it) per stream.
    part_bytes: int

    # Seconds one call may take at the most, its retries included.
    longest_call: float

    def classify(self, exc: Exception) -> StorageUnavailable | None:
        """The client's errors as the service's; messages name no bucket."""

    def exists(self, key: str) -> bool: ...

    def put(self, key: str, content: bytes) -> None: ...

    def start_upload(self, key: str) -> PartUpload: ...

    def copy(self, source: str, target: str) -> None: ...

    def delete(self, key: str) -> None:
        """Nothing happens when the object is already gone."""

    def open(self, key: str) -> BinaryIO:
        """The object for reading, streamed."""

    def list_pages(self) -> Iterator[list[tuple[str, float]]]:
        """Every object's key and last-modified time (epoch seconds), a page at a time."""

    def close(self) -> None: ...


def blob_key(sha256: str) -> str:
    return f"{sha256[:2]}/{sha256}"


class ObjectStoreBlobs:
    """A :class:`~ingest_service.domain.blobs.BlobStore` in a bucket."""

    def __init__(self, bucket: Bucket, *, spool_dir: Path, observer: BlobStoreObserver) -> None:
        """Blocking: clears the spool directory of this process's earlier run."""
        self._bucket = bucket
        self._spool_dir = spool_dir
        self._executor = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="blob-store")
        self.calls = StoreCalls(observer, bucket.classify, self._executor)
        clear_spools(spool_dir)

    @property
    def longest_call(self) -> float:
        return self._bucket.longest_call

    async def contains(self, sha256: str) -> bool:
        return await self.calls.run("head", self._bucket.exists, blob_key(sha256))

    async def put(self, sha256: str, content: bytes) -> Placement:
        if await self.contains(sha256):
            return Placement.now(reused=True)
        await self.calls.run("put", self._bucket.put, blob_key(sha256), content)
        return Placement.now(reused=False)

    async def receive(self) -> ObjectReceivedBlob:
        return ObjectReceivedBlob(self, self._bucket, Spool(self._spool_dir))

    async def read(self, sha256: str) -> AsyncIterator[bytes]:
        reader = await self.calls.run("read", self._bucket.open, blob_key(sha256))
        try:
            while chunk := await self.calls.run("read", reader.read, READ_CHUNK_BYTES):
                yield chunk
        finally:
            reader.close()

    async def listing(self) -> AsyncIterator[StoredObject]:
        pages = await self.calls.run("list", self._bucket.list_pages)
        while (page := await self.calls.run("list", next, pages, None)) is not None:
            for key, modified in page:
                if key.startswith(f"{INCOMING}/"):
                    yield StoredObject(key, None, modified)
                elif (match := _BLOB_KEY.fullmatch(key)) and match[2].startswith(match[1]):
                    yield StoredObject(key, match[2], modified)
                # Anything else is not ours to judge, and stays.

    async def delete(self, key: str) -> None:
        await self.calls.run("delete", self._bucket.delete, key)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown)
        self._bucket.close()


class ObjectReceivedBlob:
    """Streamed content: a local spool file, and the temporary object sent from it."""

    def __init__(self, store: ObjectStoreBlobs, bucket: Bucket, spool: Spool) -> None:
        self._store = store
        self._bucket = bucket
        self._calls = store.calls
        self._spool = spool
        self._temporary = f"{INCOMING}/{uuid.uuid4().hex}"
        self._upload: PartUpload | None = None
        self._sent = 0
        self._completed = False
        self._discarded = False

    @property
    def size(self) -> int:
        return self._spool.size

    async def write(self, chunks: Sequence[bytes]) -> None:
        await self._calls.run("write", self._spool.append, chunks)
        part_bytes = self._bucket.part_bytes
        while self._spool.size - self._sent >= part_bytes:
            await self._send(part_bytes)

    async def finish(self) -> str:
        sha256 = await self._calls.run("write", lambda: self._spool.finish(durable=False))
        if self._upload is None or self._sent < self._spool.size:
            await self._send(self._spool.size - self._sent)
        await self._calls.run("complete", self._complete)
        return sha256

    def mapped(self) -> mmap.mmap:
        return self._spool.mapped()

    async def store(self, sha256: str) -> Placement:
        if await self._store.contains(sha256):
            return Placement.now(reused=True)
        await self._calls.run("copy", self._bucket.copy, self._temporary, blob_key(sha256))
        return Placement.now(reused=False)

    async def discard(self) -> None:
        if self._discarded:
            return
        self._discarded = True
        try:
            if self._completed:
                await self._calls.run("delete", self._bucket.delete, self._temporary)
            elif self._upload is not None:
                await self._calls.run("abort", self._upload.abort)
        except StorageUnavailable:
            # The sweep removes a temporary object later; an unfinished S3 upload is what a
            # bucket lifecycle rule (AbortIncompleteMultipartUpload) is for.
            logger.warning("could not remove the temporary object of a streamed upload")
        finally:
            await self._calls.run("write", self._spool.remove)

    async def _send(self, length: int) -> None:
        part = await self._calls.run("write", self._spool.read_at, self._sent, length)
        if self._upload is None:
            await self._calls.run("start_upload", self._start_upload)
        assert self._upload is not None
        await self._calls.run("upload_part", self._upload.send, part)
        self._sent += len(part)

    def _start_upload(self) -> None:
        """Run in the store's thread, so that the upload is recorded even when the caller is
        cancelled meanwhile (``StoreCalls.run`` then waits for the thread and raises, the
        result dropped): ``discard`` must still find it to abort."""
        self._upload = self._bucket.start_upload(self._temporary)

    def _complete(self) -> None:
        """In the store's thread too: a completed upload is an object ``discard`` deletes."""
        assert self._upload is not None
        self._upload.complete()
        self._completed = True
