"""Reading ahead on a fake clock: the jobs claimed ahead are looked up in the result cache and
their bytes read before a worker starts them, within a byte budget, and a job given back
unstarted lets go of both (its claim on the key too, so another replica need not wait it out).

A real JobQueue, ResultCache and ReadAhead on the in-memory store (``shared``: it stands for
a database other replicas use); the stand-in is for the ingest service's bytes. Through the
whole pool: tests/test_worker_rules.py (identical content under claims ahead).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from analysis_service.config import RetryPolicy
from analysis_service.domain.cache import ResultCache
from analysis_service.domain.claims import READY_TTL
from analysis_service.domain.hub import StatusHub
from analysis_service.domain.models import ClaimedJob, JobResult, JobSpec, JobStatus
from analysis_service.domain.queue import JobQueue
from analysis_service.domain.read_ahead import READ_AHEAD_BYTES, ReadAhead
from analysis_service.domain.store import NewResult
from analysis_service.storage.memory_store import MemoryQueueStore
from tests.queue_support import Ingest, LoopClock, content, spec

pytestmark = pytest.mark.looptime

RETRY = RetryPolicy(max_attempts=3, backoff_base=1.0, backoff_max=60.0, jitter=0.0)
LEASE = 30.0
SUBMITTED = 200
# Workers starting this many jobs at once start claims ahead (see JobQueue._claim_ahead).
STARTS = 40
OTHER_REPLICA = "another replica"
RESULT = JobResult(("tag",), np.ones(4, dtype=np.float32), 4, "test", "1", reused=False)


@dataclass
class Replica:
    """One replica's queue, result cache and read-ahead on a store other replicas share."""

    queue: JobQueue
    store: MemoryQueueStore
    cache: ResultCache
    ahead: ReadAhead
    ingest: Ingest

    def key_of(self, job: JobSpec) -> str:
        return self.cache.key(job.sha256, {})

    async def start_workers(self) -> list[ClaimedJob]:
        """STARTS jobs started at once (as workers would), each taking what was read for it."""
        started = []
        for _ in range(STARTS):
            job = await self.queue.claim()
            assert job is not None
            self.ahead.start(job)
            started.append(job)
        await asyncio.sleep(0.001)
        return started

    async def claimed_ahead(self, started: list[ClaimedJob]) -> list[str]:
        """The media ids claimed ahead: PROCESSING, and not started."""
        held = {job.spec.media_id for job in started}
        claimed = []
        for number in range(SUBMITTED):
            job = await self.store.get_job(spec(number).media_id, with_embedding=False)
            assert job is not None
            if job.status is JobStatus.PROCESSING and job.spec.media_id not in held:
                claimed.append(job.spec.media_id)
        return claimed


def replica(*, max_bytes: int = READ_AHEAD_BYTES) -> Replica:
    clock = LoopClock()
    hub = StatusHub(buffer_size=4096, max_watchers=10)
    store = MemoryQueueStore(publish=hub.publish, clock=clock, shared=True)
    queue = JobQueue(store, hub, RETRY, LEASE, clock=clock)
    cache = ResultCache(store, analyzer_name="test", analyzer_version="1")
    ingest = Ingest()
    ahead = ReadAhead(cache, ingest, lambda job: cache.key(job.sha256, {}), max_bytes=max_bytes)
    queue.tell_claims_ahead(ahead)
    return Replica(queue, store, cache, ahead, ingest)


async def test_a_job_claimed_ahead_is_looked_up_and_read_before_a_worker_starts_it() -> None:
    running = replica()
    await running.queue.submit([spec(n) for n in range(SUBMITTED)])
    started = await running.start_workers()

    ahead = await running.claimed_ahead(started)
    assert ahead, "no job was claimed ahead of workers starting jobs this fast"
    assert set(ahead) <= set(running.ingest.read_ids), "a job claimed ahead was not read ahead"
    first = await running.queue.claim()
    assert first is not None
    assert first.spec.media_id == ahead[0]
    key = running.key_of(first.spec)
    assert await running.store.take_analyses([key], OTHER_REPLICA, 60.0) == [False], (
        "the key of a job claimed ahead was not claimed for this replica"
    )

    # The worker that starts it finds its bytes read and its look-up answered.
    started_key, reading = running.ahead.start(first)
    assert started_key == key
    assert reading.done()
    assert reading.result() == content(int(first.spec.media_id.removeprefix("media-")))
    recorded: list[JobResult] = []

    async def record(result: JobResult, result_key: str, new_result: NewResult | None) -> None:
        recorded.append(result)

    async def compute() -> JobResult:
        return RESULT

    async with asyncio.timeout(1.0):
        result = await running.cache.get_or_compute(key, first.spec.sha256, compute, record)
    assert result == RESULT
    assert recorded == [RESULT]
    reads = Counter(running.ingest.read_ids)
    assert reads[first.spec.media_id] == 1, "the bytes were read again when the job started"


async def test_a_job_given_back_unstarted_lets_go_of_its_claim_on_the_key_and_its_bytes() -> None:
    running = replica()
    await running.queue.submit([spec(n) for n in range(SUBMITTED)])
    started = await running.start_workers()
    ahead = await running.claimed_ahead(started)
    assert ahead
    keys = [running.key_of(spec(int(media_id.removeprefix("media-")))) for media_id in ahead]
    assert running.ahead.bytes_held > 0
    assert await running.store.take_analyses(keys[:1], OTHER_REPLICA, 60.0) == [False]

    # No worker starts them: after READY_TTL they go back, and another replica takes each
    # key at once instead of waiting out the claim (60 s).
    await asyncio.sleep(READY_TTL + 0.01)
    assert await running.claimed_ahead(started) == []
    assert await running.store.take_analyses(keys, OTHER_REPLICA, 60.0) == [True] * len(keys)
    assert running.ahead.bytes_held == 0


async def test_the_bytes_read_ahead_stay_within_their_budget() -> None:
    item_size = spec(0).size_bytes
    running = replica(max_bytes=3 * item_size + item_size // 2)
    await running.queue.submit([spec(n) for n in range(SUBMITTED)])
    started = await running.start_workers()
    ahead = await running.claimed_ahead(started)
    assert len(ahead) > 3

    # The first three fit; the others are read by the worker that starts them.
    budget = 3 * item_size
    assert running.ahead.bytes_held == budget
    assert [media_id for media_id in running.ingest.read_ids if media_id in ahead] == ahead[:3]
    for _ in range(len(ahead)):
        job = await running.queue.claim()
        assert job is not None
        _, reading = running.ahead.start(job)
        assert await reading == job.spec.content_ref.encode()
        started.append(job)
        # Starting tops up the claims ahead; their reads stay within the budget.
        assert running.ahead.bytes_held <= budget
    reads = Counter(running.ingest.read_ids)
    assert [reads[job.spec.media_id] for job in started] == [1] * len(started), (
        "an item was read twice"
    )
