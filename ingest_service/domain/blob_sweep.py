"""The blob sweep: removes what a crash left in the blob store.

A process killed between storing a blob and committing the row naming it leaves an orphan
blob; one killed while a stream's temporary object exists leaves that. Neither is ever
named by a row, so once older than the grace period (much longer than any upload takes from
its blob to its row) they are removed. The sweep runs at start and then every interval, in
every ingest process; several sweeping one shared store at once only repeat each other's
deletes.

Blobs are judged in batches, each in one database write transaction: which of them some row
names, then the deletes of the others, then the commit. Uploads commit their rows in write
transactions too, so a row naming a blob either committed before the batch looked (and the
blob is kept) or commits after its delete, and its uploader, whose blob was old enough to
be judged, finds it gone and stores it again (see ``blobs.Placement``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ingest_service.domain.blobs import BlobStore, StoredObject
from ingest_service.errors import IngestError
from ingest_service.storage import repository
from ingest_service.storage.repository import writing
from mediatag_common.async_database import Database
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# Blobs judged per database transaction (and deleted while it is open).
BATCH = 500
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
    """Removes blobs no row names, and temporary objects, older than ``grace_period``."""

    def __init__(
        self, *, db: Database, blobs: BlobStore, grace_period: float, interval: float
    ) -> None:
        self._db = db
        self._blobs = blobs
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
        cutoff = time.time() - self._grace_period - MODIFIED_RESOLUTION
        orphans = temporary = 0
        batch: list[StoredObject] = []
        async for stored in self._blobs.listing():
            if stored.modified > cutoff:
                continue
            if stored.sha256 is None:
                await self._blobs.delete(stored.key)
                temporary += 1
                continue
            batch.append(stored)
            if len(batch) == BATCH:
                orphans += await self._sweep_batch(batch)
                batch = []
        if batch:
            orphans += await self._sweep_batch(batch)
        return SweepReport(orphans, temporary)

    async def _sweep_batch(self, candidates: list[StoredObject]) -> int:
        limit = asyncio.Semaphore(DELETE_CONCURRENCY)

        async def delete(orphan: StoredObject) -> None:
            async with limit:
                await self._blobs.delete(orphan.key)

        async with writing(self._db) as conn:
            named = await repository.referenced_sha256(
                conn, [stored.sha256 for stored in candidates if stored.sha256]
            )
            orphans = [stored for stored in candidates if stored.sha256 not in named]
            # Deleted before the transaction ends: see the module's docstring.
            await asyncio.gather(*(delete(orphan) for orphan in orphans))
        for orphan in orphans:
            logger.info("blob sweep: removed blob %s, which no media names", orphan.sha256)
        return len(orphans)

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
