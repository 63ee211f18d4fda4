"""The blob sweep: removes what a crash left in the blob store.

A process killed between storing a blob and committing the row naming it leaves an orphan
blob; one killed while a stream's temporary object exists leaves that. Neither is ever
named by a row, so once older than the grace period (much longer than any upload takes from
its blob to its row) they are removed. The sweep runs at start and then every interval, in
every ingest process; several sweeping one shared store at once only repeat each other's
deletes.

Blobs are judged in batches, each in one database transaction that no media row can commit
past (in any process: see ``IngestStore.remove_unreferenced``): which of them some row
names, then the deletes of the others, then the commit. So a row naming a blob either
committed before the batch looked (and the blob is kept) or commits after its delete, and
its uploader, whose blob was old enough to be judged, finds it gone and stores it again
(see ``blobs.Placement``). That holds only if every delete has ended before the transaction
does: one still in flight could remove a blob that a row committed since names. So a failed
delete does not end the batch early (the others are waited for, and it is tried again at the
next sweep), and the transaction is kept open as long as the deletes may take. Uploads wait
for it meanwhile, so a batch starts deletes for a few seconds only, leaving the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

from ingest_service.domain.blobs import BlobStore, StoredObject
from ingest_service.domain.store import IngestStore
from ingest_service.errors import IngestError
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# Blobs judged per database transaction (and deleted while it is open).
BATCH = 100
# How long a batch starts deletes; those not started by then wait for the next sweep.
DELETE_BUDGET = 5.0
# Deletes in flight at once within a batch.
DELETE_CONCURRENCY = 16
# Stores tell when an object was written to the second (S3 truncates), so an object may be
# up to this much younger than its time says.
MODIFIED_RESOLUTION = 1.0


@dataclass(frozen=True)
class SweepReport:
    """What one sweep removed."""

    orphans: int
    temporary: int


class BlobSweep:
    """Removes blobs no row names older than ``grace_period``, and temporary objects older
    than that and the longest upload."""

    def __init__(
        self,
        *,
        store: IngestStore,
        blobs: BlobStore,
        grace_period: float,
        interval: float,
        temporary_grace: float,
    ) -> None:
        """``temporary_grace``: how old a temporary object is once it may be a leftover. S3
        dates an object made of parts from the start of its upload: one whose stream ran for
        hours looks that old once complete, while it is still being copied to its key."""
        self._store = store
        self._blobs = blobs
        self._temporary_grace = temporary_grace
        # A delete started at the end of the budget ends within the store's longest call.
        self._longest_batch = DELETE_BUDGET + blobs.longest_call
        self._grace_period = grace_period
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="blob-sweep")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def sweep(self) -> SweepReport:
        """One pass over the store; raises StorageUnavailable when the store or database fails."""
        now = time.time() - MODIFIED_RESOLUTION
        cutoff, temporary_cutoff = now - self._grace_period, now - self._temporary_grace
        orphans = temporary = 0
        batch: list[StoredObject] = []
        async for stored in self._blobs.listing():
            if stored.sha256 is None:
                if stored.modified <= temporary_cutoff:
                    await self._blobs.delete(stored.key)
                    temporary += 1
                continue
            if stored.modified > cutoff:
                continue
            batch.append(stored)
            if len(batch) == BATCH:
                orphans += await self._sweep_batch(batch)
                batch = []
        if batch:
            orphans += await self._sweep_batch(batch)
        return SweepReport(orphans, temporary)

    async def _sweep_batch(self, candidates: list[StoredObject]) -> int:
        by_sha256 = {stored.sha256: stored for stored in candidates if stored.sha256}

        async def delete_all(orphans: Collection[str]) -> set[str]:
            deadline = time.monotonic() + DELETE_BUDGET
            limit = asyncio.Semaphore(DELETE_CONCURRENCY)
            deleted: set[str] = set()

            async def delete(sha256: str) -> None:
                async with limit:
                    if time.monotonic() > deadline:
                        return
                    try:
                        await self._blobs.delete(by_sha256[sha256].key)
                    except IngestError as exc:
                        logger.warning("blob sweep: blob %s not removed: %s", sha256, exc)
                    else:
                        deleted.add(sha256)

            # A bug in one cancels the others, and the group waits until each has ended.
            async with asyncio.TaskGroup() as group:
                for sha256 in sorted(orphans):
                    group.create_task(delete(sha256))
            return deleted

        # Deleted before the transaction ends: see the module's docstring.
        removed = await self._store.remove_unreferenced(
            by_sha256.keys(), delete_all, open_for=self._longest_batch
        )
        for sha256 in sorted(removed):
            logger.info("blob sweep: removed blob %s, which no media names", sha256)
        return len(removed)

    async def _loop(self) -> None:
        while True:
            try:
                report = await self.sweep()
            except IngestError as exc:
                logger.warning("blob sweep failed, tried again in %g s: %s", self._interval, exc)
            else:
                if report.orphans or report.temporary:
                    logger.info(
                        "blob sweep removed %d orphan blob(s) and %d temporary object(s)",
                        report.orphans,
                        report.temporary,
                    )
            await asyncio.sleep(self._interval)
