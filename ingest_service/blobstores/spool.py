"""A local temp file that hashes what is appended to it: how streamed content arrives."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

PREFIX = ".incoming-"


class Spool:
    """Appended in order and hashed on the way; every method but the constructor blocks.

    The file is made by the first append, in the thread that writes, so that making a spool
    never leaves a file behind a caller cancelled before it could remove it. Thread-safe:
    removing it (the client went away) waits for a write in progress instead of closing the
    file under it.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._lock = threading.Lock()
        self._removed = False
        self.path: Path | None = None
        self.size = 0

    def append(self, chunks: Sequence[bytes]) -> None:
        with self._lock:
            if self._removed:
                raise FileNotFoundError("the spool file was removed")
            if self._file is None:
                descriptor, name = tempfile.mkstemp(dir=self._directory, prefix=PREFIX)
                self.path = Path(name)
                self._file = os.fdopen(descriptor, "w+b")
            for chunk in chunks:
                self._file.write(chunk)
                self._hash.update(chunk)
                self.size += len(chunk)

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` of what was appended."""
        with self._lock:
            file = self._opened()
            file.flush()
            return os.pread(file.fileno(), length, offset)

    def finish(self, *, durable: bool) -> str:
        """Everything appended is in the file (on disk, when ``durable``); its hex SHA-256."""
        with self._lock:
            file = self._opened()
            file.flush()
            if durable:
                os.fsync(file.fileno())
            return self._hash.hexdigest()

    def mapped(self) -> mmap.mmap:
        """The content mapped read-only, for checks that need random access."""
        return mmap.mmap(self._opened().fileno(), 0, access=mmap.ACCESS_READ)

    def remove(self) -> None:
        """Close and delete the file; safe to call more than once."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
            if self._file is None or self.path is None:
                return
            try:
                # Closing flushes what is buffered, which fails as the write did on a full
                # disk: the file goes all the same.
                with contextlib.suppress(OSError):
                    self._file.close()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def _opened(self) -> BinaryIO:
        if self._file is None:
            raise FileNotFoundError("nothing was appended to the spool")
        return self._file


def clear_spools(directory: Path) -> None:
    """Make ``directory`` and remove what an earlier process left there half-written."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(f"{PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            logger.info("removed a partial upload left by an earlier run: %s", leftover.name)
