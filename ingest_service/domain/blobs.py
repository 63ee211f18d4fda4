"""The blob store as the domain sees it: media bytes by their SHA-256, stored once.

One store may be shared by several ingest processes (a bucket in Cloud Storage or S3), so
whatever one stores, another reads. Implementations live outside the domain
(``ingest_service.blobstores``: a local directory, Cloud Storage, S3); they raise the
service's ``StorageUnavailable`` family when the store fails, never their library's errors.

Order is what keeps every row's bytes: a blob is stored before the row naming it commits, and
the sweep (``blob_sweep``) removes only blobs that no row names and that are older than its
grace period. One race is left to the uploader: a blob found already stored (or stored longer
ago than half the grace period) may be an orphan the sweep is deleting that very moment, so
after its row commits the uploader checks it is still there and stores it again if not
(:meth:`Placement.may_be_swept`). The sweep checks the rows and deletes in one database write
transaction, which orders it against every commit.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Placement:
    """How a blob came to be at its key."""

    # The key held the content already (another upload of the same bytes stored it).
    reused: bool
    # When this process stored or found it (time.monotonic()).
    at: float

    @classmethod
    def now(cls, *, reused: bool) -> Placement:
        return cls(reused, time.monotonic())

    def may_be_swept(self, grace_period: float) -> bool:
        """True when the sweep may have judged this blob an orphan before its row committed.

        A blob found stored may be an old orphan; one stored here is new to the sweep for
        its grace period (half of it, leaving room for clocks that disagree).
        """
        return self.reused or time.monotonic() - self.at > grace_period / 2


@dataclass(frozen=True)
class StoredObject:
    """One object of the store, as its listing shows it."""

    # The key within the store; what :meth:`BlobStore.delete` takes.
    key: str
    # The blob's SHA-256, or None for a temporary object (content being received).
    sha256: str | None
    # When it was last written (seconds since the epoch, the store's clock).
    modified: float


class ReceivedBlob(Protocol):
    """Streamed content on its way into the store, before its digest is known.

    Written in order, hashed on the way; :meth:`finish` makes it whole (in a temporary place:
    a temp file, a temporary object), :meth:`store` copies it to its key. :meth:`discard`
    removes whatever is temporary (aborting an unfinished multipart upload) and is safe to
    call at any point, more than once: a ``finally`` always calls it.
    """

    @property
    def size(self) -> int:
        """Bytes written so far."""

    async def write(self, chunks: Sequence[bytes]) -> None:
        """Append ``chunks``; may send a part to the store once enough has arrived."""

    async def finish(self) -> str:
        """Complete the temporary copy; returns the content's hex SHA-256."""

    def mapped(self) -> mmap.mmap:
        """The finished content mapped read-only (blocking: call off the event loop)."""

    async def store(self, sha256: str) -> Placement:
        """Put the finished content at ``sha256``'s key, unless it is already there.

        The temporary copy stays until :meth:`discard`, so this can be called again.
        """

    async def discard(self) -> None:
        """Remove the temporary copy, or abort the upload it is."""


class BlobStore(Protocol):
    """Bytes by their hex SHA-256. Every method is a coroutine or an async iterator: stores
    that block run their calls off the event loop, each with a timeout."""

    @property
    def longest_call(self) -> float:
        """Seconds one call may take at the most, its retries included: how long the sweep
        waits for a delete it started."""

    async def contains(self, sha256: str) -> bool:
        """True when the blob is stored (blobs are whole once at their key)."""

    async def put(self, sha256: str, content: bytes) -> Placement:
        """Store ``content`` at ``sha256``'s key unless it is already there.

        The caller vouches for the digest (it hashed the content).
        """

    async def receive(self) -> ReceivedBlob:
        """Start receiving streamed content."""

    def read(self, sha256: str) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks, streamed from the store; ``BlobMissing`` when the
        store does not hold it."""

    def listing(self) -> AsyncIterator[StoredObject]:
        """Every blob and temporary object of the store (what the sweep looks at)."""

    async def delete(self, key: str) -> None:
        """Remove the object at ``key``; nothing happens when it is already gone."""

    async def close(self) -> None:
        """Release the store's clients and threads."""
