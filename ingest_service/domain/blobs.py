"""A content-addressed store of media bytes on the local filesystem.

Each blob lives at ``root/ab/<sha256>`` and is written atomically: a temp file in the
same directory is written and fsynced, renamed over the final name, and the directory is
fsynced, so a crash leaves either the whole blob or none. Identical content is stored once.
The 256 fan-out directories are made once, up front, so that storing a blob costs two
fsyncs and never a directory creation. Every method blocks: call it off the event loop.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO


class BlobStore:
    """Bytes by their hex SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._make_fan_out()

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
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
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


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
