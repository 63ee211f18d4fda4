"""A local temp file that hashes what is appended to it: how streamed content arrives."""

from __future__ import annotations

import contextlib
import fcntl
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
    never leaves a file behind a caller cancelled before it could remove it. While open it is
    held (``flock``, dropped by the kernel with the process), so that another process starting
    on a shared directory clears what crashed processes left and nothing else. Thread-safe:
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
                self._file, self.path = _create_held(self._directory)
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


def _create_held(directory: Path) -> tuple[BinaryIO, Path]:
    """A new spool file, held (``flock``) for as long as it is open: a process that starts on
    the same directory removes only the files no running process holds."""
    while True:
        descriptor, name = tempfile.mkstemp(dir=directory, prefix=PREFIX)
        try:
            # Waits only while a process starting at this moment, which found the new file
            # not held yet, removes it.
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if _still_named(descriptor, Path(name)):
                return os.fdopen(descriptor, "w+b"), Path(name)
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)  # removed before it was held: another one


def clear_spools(directory: Path) -> None:
    """Make ``directory`` and remove what processes no longer running left there
    half-written; a file still held is another running process's upload in progress (several
    processes may share a blob directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(f"{PREFIX}*"):
        try:
            descriptor = os.open(leftover, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _still_named(descriptor, leftover):
                leftover.unlink()
                logger.info("removed a partial upload left by an earlier run: %s", leftover.name)
        except BlockingIOError:
            continue  # held: an upload in progress
        finally:
            os.close(descriptor)


def _still_named(descriptor: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``descriptor``."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
