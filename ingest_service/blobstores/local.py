"""Blobs in a local directory: ``root/ab/<sha256>``, the layout every version had.

A blob is written to a temp file in ``root/incoming/`` (same filesystem), fsynced, and
hard-linked to its name: the link is atomic and fails when the name exists, so a blob is
either whole or absent and is stored once. The directory is then fsynced and the temp name
removed. Temp files a crash left are removed at start, which is why one directory serves one
ingest process (several replicas share a bucket instead). The 256 fan-out directories are
made once, up front, so storing a blob costs two fsyncs and never a directory creation.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import BinaryIO

from ingest_service.blobstores.calls import StoreCalls, no_backend_errors
from ingest_service.blobstores.spool import Spool, clear_spools
from ingest_service.domain.blobs import Placement, StoredObject
from ingest_service.domain.observer import BlobStoreObserver
from ingest_service.errors import BlobMissing

INCOMING = "incoming"
READ_CHUNK_BYTES = 256 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


# A filesystem's calls have no timeout of their own: an unlink or a read that takes longer than
# this (a network filesystem whose server went away) is not waited for by the sweep.
LOCAL_LONGEST_CALL = 60.0


class LocalBlobStore:
    """A :class:`~ingest_service.domain.blobs.BlobStore` in a directory of this machine."""

    longest_call = LOCAL_LONGEST_CALL

    def __init__(self, root: Path, observer: BlobStoreObserver) -> None:
        """Blocking: makes the directories and clears ``incoming/``."""
        self.root = root
        self._calls = StoreCalls(observer, no_backend_errors)
        self._make_fan_out()
        clear_spools(root / INCOMING)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    async def contains(self, sha256: str) -> bool:
        return await self._calls.run("head", self._exists, sha256)

    async def put(self, sha256: str, content: bytes) -> Placement:
        return await self._calls.run("put", self._put, sha256, content)

    async def receive(self) -> LocalReceivedBlob:
        return LocalReceivedBlob(self, Spool(self.root / INCOMING), self._calls)

    async def read(self, sha256: str) -> AsyncIterator[bytes]:
        # Most blobs fit in one chunk: opened, read and closed in one call to a thread.
        blob, chunk = await self._calls.run("read", self._start_reading, sha256)
        try:
            while chunk:
                yield chunk
                chunk = await self._calls.run("read", blob.read, READ_CHUNK_BYTES) if blob else b""
        finally:
            if blob is not None:
                blob.close()

    async def listing(self) -> AsyncIterator[StoredObject]:
        for prefix in range(256):
            found = await self._calls.run("list", self._list, f"{prefix:02x}")
            for stored in found:
                yield stored

    async def delete(self, key: str) -> None:
        await self._calls.run("delete", self._unlink, key)

    async def close(self) -> None:
        return

    def link(self, spool: Spool, sha256: str) -> Placement:
        """Give the finished ``spool`` its blob's name, unless the blob is already stored."""
        path = self.path_for(sha256)
        assert spool.path is not None, "a finished spool has its file"
        try:
            os.link(spool.path, path)
        except FileExistsError:
            return Placement.now(reused=True)
        _fsync_directory(path.parent)
        return Placement.now(reused=False)

    def _start_reading(self, sha256: str) -> tuple[BinaryIO | None, bytes]:
        """The blob's first chunk, and the file open after it (None: the chunk is all of it;
        a buffered read of a file comes back short only at its end)."""
        try:
            blob = self.path_for(sha256).open("rb")
        except FileNotFoundError:
            raise BlobMissing(f"blob {sha256} is not in the blob store") from None
        try:
            chunk = blob.read(READ_CHUNK_BYTES)
        except BaseException:
            blob.close()
            raise
        if len(chunk) < READ_CHUNK_BYTES:
            blob.close()
            return None, chunk
        return blob, chunk

    def _exists(self, sha256: str) -> bool:
        try:
            self.path_for(sha256).stat()
        except FileNotFoundError:
            return False
        return True

    def _put(self, sha256: str, content: bytes) -> Placement:
        if self._exists(sha256):
            return Placement.now(reused=True)
        spool = Spool(self.root / INCOMING)
        try:
            spool.append([content])
            spool.finish(durable=True)
            return self.link(spool, sha256)
        finally:
            spool.remove()

    def _list(self, fan_out: str) -> list[StoredObject]:
        found = []
        with os.scandir(self.root / fan_out) as entries:
            for entry in entries:
                if _SHA256.fullmatch(entry.name) and entry.name.startswith(fan_out):
                    with contextlib.suppress(FileNotFoundError):
                        modified = entry.stat().st_mtime
                        found.append(StoredObject(f"{fan_out}/{entry.name}", entry.name, modified))
        return found

    def _unlink(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / key).unlink()

    def _make_fan_out(self) -> None:
        """Create the root and its 256 fan-out directories, each made durable in its parent."""
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            _fsync_directory(self.root.parent)
        created = False
        for prefix in range(256):
            directory = self.root / f"{prefix:02x}"
            if not directory.exists():
                directory.mkdir(exist_ok=True)
                created = True
        if created:
            _fsync_directory(self.root)


class LocalReceivedBlob:
    """Streamed content in a temp file of ``incoming/``, linked to its name once checked."""

    def __init__(self, store: LocalBlobStore, spool: Spool, calls: StoreCalls) -> None:
        self._store = store
        self._spool = spool
        self._calls = calls

    @property
    def size(self) -> int:
        return self._spool.size

    async def write(self, chunks: Sequence[bytes]) -> None:
        await self._calls.run("write", self._spool.append, chunks)

    async def finish(self) -> str:
        return await self._calls.run("finish", lambda: self._spool.finish(durable=True))

    def mapped(self) -> mmap.mmap:
        return self._spool.mapped()

    async def store(self, sha256: str) -> Placement:
        return await self._calls.run("put", self._store.link, self._spool, sha256)

    async def discard(self) -> None:
        await self._calls.run("discard", self._spool.remove)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
