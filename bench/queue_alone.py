"""The analysis service's ``JobQueue`` alone, over a real database, in this process.

It is built as ``analysis_service.server`` builds it (database, migrations, status hub,
retry policy and lease from the default configuration). Jobs are submitted in batches,
then claimed and completed by concurrent tasks as the workers do (jobs claimed ahead,
completions written behind): every transition is the same transaction,
with the same event appended and published, as in the service; what the pipeline adds
around it (gRPC, content fetch, result cache, analyser, heartbeats, watch streams) is absent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from analysis_service.config import AnalysisConfig
from analysis_service.domain.hub import StatusHub
from analysis_service.domain.models import JobResult, JobSpec, JobStatus, StatusEvent
from analysis_service.domain.queue import JobQueue
from analysis_service.storage.queue_store import SqlQueueStore
from analysis_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from bench.processes import cpu_seconds
from bench.simulated import TAGS
from mediatag_common.database import Database


@dataclass(frozen=True)
class QueueAloneRun:
    """Seconds to submit the jobs, then to claim and complete them all; CPU seconds used."""

    jobs: int
    submit_seconds: float
    drain_seconds: float
    cpu_seconds: float

    @property
    def seconds(self) -> float:
        return self.submit_seconds + self.drain_seconds

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds

    def __add__(self, other: QueueAloneRun) -> QueueAloneRun:
        return QueueAloneRun(
            self.jobs + other.jobs,
            self.submit_seconds + other.submit_seconds,
            self.drain_seconds + other.drain_seconds,
            self.cpu_seconds + other.cpu_seconds,
        )


def job_specs(first: int, count: int) -> list[JobSpec]:
    """Jobs ``first`` to ``first + count - 1``, each with its own content digest."""
    return [
        JobSpec(
            media_id=f"queue-{number}",
            owner_id="bench-owner",
            sha256=hashlib.sha256(f"queue-{number}".encode()).hexdigest(),
            size_bytes=2000,
            content_type="image/jpeg",
            content_ref=f"queue-{number}",
            category="Hair",
        )
        for number in range(first, first + count)
    ]


class QueueAlone:
    """A ``JobQueue`` on the new, empty database at ``url`` (SQLite or PostgreSQL); ``run``
    submits jobs in batches of ``batch``, then ``tasks`` tasks claim and complete them."""

    def __init__(
        self, url: str, *, synchronous: str, batch: int, tasks: int, dimensions: int
    ) -> None:
        self._db = Database(url, synchronous=synchronous)
        config = AnalysisConfig()
        hub = StatusHub(
            buffer_size=config.watch.stream_buffer, max_watchers=config.watch.max_watchers
        )
        store = SqlQueueStore(self._db, committed=hub.publish)
        self._queue = JobQueue(store, hub, config.retry, config.lease_seconds)
        self._batch = batch
        self._tasks = tasks
        embedding = np.full(dimensions, 1 / np.sqrt(dimensions), dtype=np.float32)
        self._result = JobResult(TAGS, embedding, dimensions, "simulated", "1", reused=False)
        self._completed = 0
        self._completions: list[asyncio.Future[StatusEvent]] = []

    async def __aenter__(self) -> QueueAlone:
        await self._db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
        await self._queue.load()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._queue.close()
        await self._db.close()

    async def run(self, specs: Sequence[JobSpec]) -> QueueAloneRun:
        cpu_before = cpu_seconds(os.getpid())
        started = time.perf_counter()
        for first in range(0, len(specs), self._batch):
            await self._queue.submit(specs[first : first + self._batch])
        submitted = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(self._tasks):
                group.create_task(self._claim_and_complete())
        # As the workers do, the completions are written behind; the run ends once they are.
        await asyncio.gather(*self._completions)
        drained = time.perf_counter()
        cpu = cpu_seconds(os.getpid()) - cpu_before
        self._completed += len(specs)
        self._completions.clear()
        counts = (await self._queue.depth()).counts
        if counts.get(JobStatus.COMPLETED, 0) != self._completed:
            raise RuntimeError(f"queue alone: {counts}, expected {self._completed} COMPLETED")
        return QueueAloneRun(len(specs), submitted - started, drained - submitted, cpu)

    async def _claim_and_complete(self) -> None:
        while (job := await self._queue.claim()) is not None:
            # The key the result cache would use: 64 hex digits, distinct per content.
            key = hashlib.sha256(job.spec.sha256.encode()).hexdigest()
            self._completions.append(await self._queue.complete(job, self._result, key))
