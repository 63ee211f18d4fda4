"""The sweep's rules with a bucket whose deletes the test holds and fails: every delete it
starts has ended before its batch's transaction does (a failed one too, which the next sweep
tries again), a batch starts deletes for a bounded time only, leaving the rest, and a
temporary object is judged by a grace of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ingest_service.domain import blob_sweep
from ingest_service.domain.blob_sweep import BlobSweep, SweepReport
from ingest_service.domain.blobs import Placement, ReceivedBlob, StoredObject
from ingest_service.errors import StorageUnavailable
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from ingest_service.storage.sql_store import SqlIngestStore
from mediatag_common.database import Database, sqlite_url
from tests.conftest import PATIENCE, wait_until


class HeldBucket:
    """Orphan blobs, all old; each delete waits for its key's release, and a key in
    ``failing`` fails its next delete (a transient error of the store)."""

    longest_call = 10.0

    def __init__(self, sha256s: list[str], temporary: dict[str, float] | None = None) -> None:
        self.objects: dict[str, str | None] = {f"blobs/{sha256}": sha256 for sha256 in sha256s}
        # Temporary objects (a stream's content before it has its key), and their times.
        self.modified = dict(temporary or {})
        self.objects.update(dict.fromkeys(self.modified))
        self.failing: set[str] = set()
        self.deleting: set[str] = set()
        self.released: set[str] = set()
        self._release = asyncio.Condition()

    async def release(self, *keys: str) -> None:
        async with self._release:
            self.released.update(keys)
            self._release.notify_all()

    async def listing(self) -> AsyncIterator[StoredObject]:
        for key, sha256 in sorted(self.objects.items()):
            yield StoredObject(key, sha256, modified=self.modified.get(key, 0.0))

    async def delete(self, key: str) -> None:
        self.deleting.add(key)
        try:
            if self.objects.get(key, "") is None:
                self.objects.pop(key)  # a temporary object: not held
                return
            if key in self.failing:
                self.failing.discard(key)
                raise StorageUnavailable("blob store unavailable")
            async with self._release:
                await asyncio.wait_for(
                    self._release.wait_for(lambda: key in self.released), PATIENCE
                )
            self.objects.pop(key, None)
        finally:
            self.deleting.discard(key)

    # Not what the sweep calls.
    async def contains(self, sha256: str) -> bool:
        raise NotImplementedError

    async def put(self, sha256: str, content: bytes) -> Placement:
        raise NotImplementedError

    async def receive(self) -> ReceivedBlob:
        raise NotImplementedError

    def read(self, sha256: str) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlIngestStore]:
    db = Database(sqlite_url(str(tmp_path / "ingest.db")))
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    yield SqlIngestStore(db)
    await db.close()


def sweep_of(store: SqlIngestStore, bucket: HeldBucket) -> BlobSweep:
    return BlobSweep(store=store, blobs=bucket, grace_period=60, interval=60, temporary_grace=60)


async def test_a_failed_delete_leaves_the_others_to_end_and_is_tried_at_the_next_sweep(
    store: SqlIngestStore,
) -> None:
    a, b, c = ("a" * 64, "b" * 64, "c" * 64)
    bucket = HeldBucket([a, b, c])
    bucket.failing.add(f"blobs/{a}")
    sweep = sweep_of(store, bucket)
    sweeping = asyncio.create_task(sweep.sweep())

    async def a_failed_while_the_others_are_under_way() -> bool:
        return bucket.deleting == {f"blobs/{b}", f"blobs/{c}"} and f"blobs/{a}" not in (
            bucket.failing
        )

    await wait_until(a_failed_while_the_others_are_under_way)
    # The batch does not end with a's failure: its transaction waits for b's and c's.
    await bucket.release(f"blobs/{b}", f"blobs/{c}")
    assert await asyncio.wait_for(sweeping, PATIENCE) == SweepReport(orphans=2, temporary=0)
    assert set(bucket.objects) == {f"blobs/{a}"}

    await bucket.release(f"blobs/{a}")
    assert await sweep.sweep() == SweepReport(orphans=1, temporary=0)
    assert bucket.objects == {}


async def test_a_batch_starts_deletes_for_a_bounded_time_and_leaves_the_rest(
    store: SqlIngestStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blob_sweep, "DELETE_CONCURRENCY", 1)
    monkeypatch.setattr(blob_sweep, "DELETE_BUDGET", 0.2)
    orphans = [f"{n:064x}" for n in range(5)]
    bucket = HeldBucket(orphans)
    sweep = sweep_of(store, bucket)
    sweeping = asyncio.create_task(sweep.sweep())
    await wait_until(lambda: _true(bool(bucket.deleting)))
    # The first delete (begun after the budget's start) outlasts the budget: the others
    # are not started.
    first_seen = time.monotonic()
    await wait_until(lambda: _true(time.monotonic() > first_seen + 0.2))
    await bucket.release(*bucket.objects)

    assert await asyncio.wait_for(sweeping, PATIENCE) == SweepReport(orphans=1, temporary=0)
    assert len(bucket.objects) == 4
    # The next sweeps take the rest, a few seconds' worth each.
    monkeypatch.setattr(blob_sweep, "DELETE_BUDGET", PATIENCE)
    assert await sweep.sweep() == SweepReport(orphans=4, temporary=0)


async def _true(value: bool) -> bool:
    return value


async def test_a_temporary_object_is_kept_for_its_own_grace(store: SqlIngestStore) -> None:
    """S3 dates an object made of parts from its upload's start: a stream that ran for hours
    completes an object that looks hours old while it is being copied to its key. It is
    kept until older than its own grace (by default the grace and the longest stream)."""
    now = time.time()
    bucket = HeldBucket(
        [], temporary={"incoming/long-stream": now - 3 * 3600, "incoming/crash": now - 6 * 3600}
    )
    sweep = BlobSweep(
        store=store, blobs=bucket, grace_period=3600, interval=60, temporary_grace=4 * 3600
    )

    assert await sweep.sweep() == SweepReport(orphans=0, temporary=1)
    assert set(bucket.objects) == {"incoming/long-stream"}
