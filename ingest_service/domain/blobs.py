"""A content-addressed store of media bytes on the local filesystem.

Each blob lives at ``root/ab/<sha256>`` and is written atomically: a temp file in
``root/incoming/`` (same filesystem, so the rename is atomic) is written and fsynced,
renamed over the final name, and the directory is fsynced, so a crash leaves either the
whole blob or none — and any temp file it leaves is removed on the next start. Identical
content is stored once. The 256 fan-out directories are made once, up front, so that storing
a blob costs two fsyncs and never a directory creation. Streamed content, whose digest is
known only at the end, is received the same way. Every method blocks: call it off the event
loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

INCOMING = "incoming"


class BlobStore:
    """Bytes by their hex SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._make_fan_out()
        self._clear_incoming()

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def contains(self, sha256: str, size: int) -> bool:
        """True when the blob is stored in full (blobs are immutable once renamed in)."""
        try:
            return self.path_for(sha256).stat().st_size == size
        except FileNotFoundError:
            return False

    def put(self, sha256: str, size: int, chunks: Iterable[bytes]) -> None:
        """Store the content ``chunks`` make up under ``sha256``, unless already stored.

        The caller vouches for the digest and size (it hashed the content while sniffing).
        """
        if self.contains(sha256, size):
            return
        path = self.path_for(sha256)
        descriptor, temp_name = tempfile.mkstemp(dir=self.root / INCOMING, prefix=".incoming-")
        try:
            with os.fdopen(descriptor, "wb") as temp:
                for chunk in chunks:
                    temp.write(chunk)
                temp.flush()
                os.fsync(temp.fileno())
            os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        _fsync_directory(path.parent)

    def open(self, sha256: str) -> BinaryIO:
        """The stored bytes for reading; raises FileNotFoundError when absent."""
        return self.path_for(sha256).open("rb")

    def incoming(self) -> IncomingBlob:
        """A new temp file to receive content into, before its digest is known."""
        descriptor, temp_name = tempfile.mkstemp(dir=self.root / INCOMING, prefix=".incoming-")
        return IncomingBlob(self, os.fdopen(descriptor, "wb"), Path(temp_name))

    def _clear_incoming(self) -> None:
        """Make ``incoming/`` and remove what an earlier process left there half-written."""
        incoming = self.root / INCOMING
        incoming.mkdir(exist_ok=True)
        for leftover in incoming.iterdir():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                logger.info("removed a partial blob left by an earlier run: %s", leftover.name)

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


class IncomingBlob:
    """Content being received: appended to a temp file and hashed as it arrives.

    Either :meth:`store` moves it into the store under its digest, or :meth:`discard` removes
    it; ``discard`` after ``store`` does nothing, so a ``finally`` can always call it.
    """

    def __init__(self, store: BlobStore, file: BinaryIO, path: Path) -> None:
        self._store = store
        self._file = file
        self._path = path
        self._hash = hashlib.sha256()
        self.size = 0
        # Held while a thread writes, so that discarding from the event loop (the client
        # went away) never closes the file under a write.
        self._lock = threading.Lock()
        self._settled = False

    def write(self, chunks: Iterable[bytes]) -> None:
        with self._lock:
            for chunk in chunks:
                self._file.write(chunk)
                self._hash.update(chunk)
                self.size += len(chunk)

    def finish(self) -> str:
        """Make the received content durable; returns its hex SHA-256."""
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return self._hash.hexdigest()

    def mapped(self) -> mmap.mmap:
        """The finished content mapped read-only, for checks that need random access."""
        with self._path.open("rb") as file:
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)

    def store(self, sha256: str) -> None:
        """Move the finished content into the store under ``sha256`` (once per digest)."""
        if self._store.contains(sha256, self.size):
            self.discard()
            return
        path = self._store.path_for(sha256)
        os.replace(self._path, path)
        self._settled = True
        _fsync_directory(path.parent)

    def discard(self) -> None:
        """Remove the temp file, unless it was stored; safe to call more than once."""
        if self._settled:
            return
        self._settled = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        with self._lock:
            self._file.close()


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
