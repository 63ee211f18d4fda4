"""The outbox forwarder: delivers committed analysis jobs with ``SubmitJobs``, until accepted.

Outbox rows commit with their media rows, so a job survives a crash, a restart or an
analysis outage; a row is deleted only once the analysis service has accepted its job
(``SubmitJobs`` is idempotent by media id, so a delivery repeated after a crash is harmless).

Every ingest replica runs a forwarder on the shared outbox. A forwarder leases the batch it
delivers (:data:`LEASE` seconds, on the database's clock), so two replicas never deliver
one job at once; a failed delivery gives its lease back at once, and the batch of a
replica that died mid-delivery is handed to another once its lease ends. Besides being
woken by its own replica's uploads, a forwarder looks at the outbox every
:data:`POLL_INTERVAL` seconds, for jobs other replicas left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ingest_service.domain.analysis import CALL_TIMEOUT, AnalysisService
from ingest_service.domain.models import Media
from ingest_service.domain.observer import IngestObserver
from ingest_service.domain.store import IngestStore
from ingest_service.errors import IngestError, StorageUnavailable
from mediatag_common.backoff import Backoff
from mediatag_common.errors import ServiceError
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# How long a claimed batch is a forwarder's alone: well past the SubmitJobs deadline, so a
# live forwarder finishes first; the delay before another replica delivers a dead one's.
LEASE = 3 * CALL_TIMEOUT
# How often an idle forwarder looks for jobs no upload of its own replica woke it for.
POLL_INTERVAL = 5.0


class OutboxForwarder:
    """A background task that empties the outbox into the analysis service."""

    def __init__(
        self,
        *,
        store: IngestStore,
        analysis: AnalysisService,
        batch_size: int,
        initial_backoff: float,
        max_backoff: float,
        observer: IngestObserver,
    ) -> None:
        self._store = store
        self._analysis = analysis
        self._batch_size = batch_size
        self._backoff = Backoff(initial_backoff, max_backoff)
        self._observer = observer
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """New rows were committed: deliver them now (unless backing off from a failure)."""
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-forwarder")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                delivered = await self._deliver_batch()
            except Exception as exc:
                self._observer.delivery_failed()
                await self._back_off(exc)
                continue
            if self._backoff.failures:
                logger.info("outbox delivery to the analysis service works again")
                self._backoff.reset()
            for media in delivered:
                logger.info(
                    "handed media %s (%r) to analysis, priority %d",
                    media.id,
                    media.filename,
                    media.priority,
                )
            if len(delivered) < self._batch_size:
                # Nothing more to claim: sleep until an upload commits, or the next look.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL):
                        await self._wakeup.wait()

    async def _deliver_batch(self) -> list[Media]:
        """Deliver the oldest batch nobody else is delivering; returns what was delivered."""
        claim = await self._store.claim_jobs(self._batch_size, lease=LEASE)
        if not claim.jobs:
            return []
        media = [job.media for job in claim.jobs]
        try:
            existing = await self._analysis.submit_jobs(media)
        except BaseException:
            # Given back for the next try (of any replica); if even that fails, the lease
            # ends by itself.
            with contextlib.suppress(IngestError):
                await asyncio.shield(self._store.release_jobs(claim))
            raise
        await self._store.complete_jobs([job.outbox_id for job in claim.jobs])
        self._observer.jobs_delivered(len(claim.jobs))
        if existing:
            logger.debug("%d job(s) were already known to analysis", existing)
        return media

    async def backlog(self) -> int:
        """The jobs waiting in the outbox now."""
        return await self._store.outbox_size()

    async def _back_off(self, error: Exception) -> None:
        delay = self._backoff.next_delay()
        if self._backoff.failures == 1:
            waiting = await self._waiting_jobs()
            expected = isinstance(error, ServiceError)
            problem = str(error) if expected else f"{type(error).__name__}: {error}"
            logger.warning(
                "cannot deliver analysis jobs (%s); %s job(s) wait in the outbox, "
                "retrying with backoff until delivered",
                problem,
                waiting,
                exc_info=not expected,
            )
        # Uploads during an outage do not cut the backoff short; their rows wait with the rest.
        await asyncio.sleep(delay)

    async def _waiting_jobs(self) -> str:
        try:
            return str(await self.backlog())
        except StorageUnavailable:
            return "an unknown number of"
