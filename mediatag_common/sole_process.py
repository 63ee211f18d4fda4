"""A lock file that keeps a second process off what this one must use alone.

The analysis service on SQLite publishes each commit's status changes to its own watchers
as it commits: a second process on the same file would commit changes that the first one's
watchers never see (their streams would skip revisions), and would keep rate limits of its
own. So the first process holds an exclusive ``flock`` on a file beside the database, and
another is refused at start. The kernel drops the lock with the process, killed or not: no
stale lock to clean up after a crash.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class HeldByAnotherProcess(Exception):
    """The lock is held by another process (``holder``: the pid it wrote, if any)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by process {holder or 'unknown'}")
        self.path = path
        self.holder = holder


class SoleProcessLock:
    """An exclusive lock on ``path`` (created if missing) for as long as it is held."""

    def __init__(self, path: Path) -> None:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
            os.close(descriptor)
            raise HeldByAnotherProcess(path, holder) from None
        except BaseException:
            os.close(descriptor)
            raise
        # For the refusal of the next process: who holds it.
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        """Let another process take it; safe to call twice."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
