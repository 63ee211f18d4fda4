"""The workers' rules on a fake clock: retries on the backoff schedule, quota and content
deferrals, heartbeats and lease takeover, the analyser timeout beside the rate limit,
draining, pause, and single flight of identical content.

A real WorkerPool, JobQueue, RateLimits, ResultCache and Maintenance run on the in-memory
store, with the event loop's clock fast-forwarded by looptime (see tests/queue_support.py):
a test that waits out a minute of backoff takes milliseconds, and call times are exact. The
stand-ins are for what the workers reach beyond the service: the analyser's upstream API and
the ingest service's bytes. The same rules through real servers are in test_pipeline.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from analysis_service.analyzers.base import AnalysisInput, AnalysisOutput, ApiLimit, RateLimiter
from analysis_service.config import RetryPolicy, WatchConfig
from analysis_service.domain.cache import ResultCache
from analysis_service.domain.hub import StatusHub, Subscription, WatchFilter
from analysis_service.domain.limits import RateLimits
from analysis_service.domain.maintenance import Maintenance
from analysis_service.domain.models import AttemptOutcome, ClaimedJob, Job, JobStatus, StatusEvent
from analysis_service.domain.observer import AnalysisObserver, NoObserver
from analysis_service.domain.queue import JobQueue
from analysis_service.domain.stats import Throughput
from analysis_service.domain.workers import WorkerPool
from analysis_service.errors import (
    PermanentAnalyzerError,
    QuotaExceeded,
    StorageUnavailable,
    TransientAnalyzerError,
)
from analysis_service.storage.memory_store import MemoryQueueStore
from tests.queue_support import EPOCH, Ingest, LoopClock, spec

pytestmark = pytest.mark.looptime

API = "vision"
LEASE = 30.0
# Backoff 1 s, 2 s, 4 s... without jitter, so that call times are exact.
RETRY = RetryPolicy(max_attempts=3, backoff_base=1.0, backoff_max=60.0, jitter=0.0)
# Loop time a test waits for the next change before calling it a hang (no real time).
HANG = 3600.0


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def gaps(times: Sequence[float]) -> list[float]:
    """Time between consecutive instants, to the loop's tick (a microsecond)."""
    return [round(later - earlier, 6) for earlier, later in itertools.pairwise(times)]


def reason(event: StatusEvent) -> str | None:
    return event.error.reason if event.error else None


@dataclass
class Upstream:
    """The analyser's upstream API, scripted. A call for a media id raises the next of its
    ``failures`` (then answers), or ``fail_always``'s error; each takes ``duration`` seconds.
    The first ``degraded`` answers are the analyser's fallback. Calls are recorded at the
    loop's time, once the rate limit let them through."""

    failures: dict[str, list[Exception]] = field(default_factory=dict)
    fail_always: dict[str, Exception] = field(default_factory=dict)
    duration: float = 0.0
    # A power of two (or a whole number of seconds between calls), so that the rate
    # limiter's arithmetic is exact on the fake clock: aiolimiter sets its next wake-up from
    # float levels, and one a rounding error after now fires without the clock moving, for
    # ever (on a real clock time moves on and it ends).
    rate_per_second: float = 64.0
    calls: list[tuple[str, float]] = field(default_factory=list)
    # The calls whose caller went away before the answer.
    cancelled: list[tuple[str, float]] = field(default_factory=list)
    name: str = "scripted"
    version: str = "1"
    degraded: int = 0

    @property
    def api_limits(self) -> Sequence[ApiLimit]:
        return [ApiLimit(API, self.rate_per_second, 1)]

    def cache_inputs(self, category: str, context: Mapping[str, str]) -> Mapping[str, str]:
        return {}

    async def analyze(self, item: AnalysisInput, limiter: RateLimiter) -> AnalysisOutput:
        await limiter.acquire(API)
        self.calls.append((item.media_id, loop_time()))
        try:
            await asyncio.sleep(self.duration)
        except asyncio.CancelledError:
            self.cancelled.append((item.media_id, loop_time()))
            raise
        if item.media_id in self.fail_always:
            raise self.fail_always[item.media_id]
        if self.failures.get(item.media_id):
            raise self.failures[item.media_id].pop(0)
        degraded = self.degraded > 0
        self.degraded -= degraded
        return AnalysisOutput(("tag",), np.full(4, 0.5, dtype=np.float32), degraded)

    def call_times(self, number: int) -> list[float]:
        return [at for media_id, at in self.calls if media_id == spec(number).media_id]


@dataclass
class Service:
    """The analysis service's domain, running on the fake clock."""

    queue: JobQueue
    store: MemoryQueueStore
    pool: WorkerPool
    watcher: Subscription
    seen: list[StatusEvent] = field(default_factory=list)

    async def get(self, number: int) -> Job:
        job = await self.store.get_job(spec(number).media_id, with_embedding=False)
        assert job is not None
        return job

    async def until(self, status: JobStatus, *numbers: int) -> list[StatusEvent]:
        """The events that take each of ``numbers`` to ``status`` (waiting on the watcher)."""
        wanted = {spec(n).media_id for n in numbers}
        reached: dict[str, StatusEvent] = {}
        while len(reached) < len(wanted):
            event = await self.watcher.next(HANG)
            assert event is not None, f"no change within {HANG:.0f} s of loop time"
            self.seen.append(event)
            if event.status is status and event.media_id in wanted:
                reached[event.media_id] = event
        return [reached[spec(n).media_id] for n in numbers]


@asynccontextmanager
async def service(
    upstream: Upstream,
    *,
    ingest: Ingest | None = None,
    retry: RetryPolicy = RETRY,
    workers: int = 1,
    lease: float = LEASE,
    analyzer_timeout: float = 60.0,
    pacing: float = 0.0,
    observer: AnalysisObserver | None = None,
    store_type: type[MemoryQueueStore] = MemoryQueueStore,
) -> AsyncIterator[Service]:
    clock = LoopClock()
    hub = StatusHub(buffer_size=1024, max_watchers=10)
    store = store_type(publish=hub.publish, clock=clock)
    queue = JobQueue(store, hub, retry, lease, delivery_pacing=pacing, clock=clock)
    pool = WorkerPool(
        queue=queue,
        analyzer=upstream,
        limits=RateLimits(upstream.api_limits, {}, clock=clock),
        cache=ResultCache(store, analyzer_name=upstream.name, analyzer_version=upstream.version),
        content=ingest or Ingest(),
        size=workers,
        analyzer_timeout=analyzer_timeout,
        throughput=Throughput(),
        observer=observer or NoObserver(),
        clock=clock,
    )
    maintenance = Maintenance(queue, WatchConfig(), clock)
    running = Service(queue, store, pool, hub.subscribe(WatchFilter()))
    pool.start()
    maintenance.start()
    try:
        yield running
    finally:
        await maintenance.stop()
        await pool.drain(0.0)
        await queue.close()


# ---- retries ----


async def test_a_flaky_upstream_is_called_again_on_the_backoff_schedule_until_it_answers() -> None:
    upstream = Upstream(failures={spec(1).media_id: [TransientAnalyzerError("503")] * 2})
    async with service(upstream) as running:
        await running.queue.submit([spec(1)])
        (done,) = await running.until(JobStatus.COMPLETED, 1)
        assert done.attempt == 3
        assert gaps(upstream.call_times(1)) == [1.0, 2.0]
        job = await running.get(1)
        assert [a.outcome for a in job.attempts] == ["RETRY_SCHEDULED"] * 2 + ["COMPLETED"]
        # Every change reached the watcher, in revision order, none missing.
        revisions = [event.revision for event in running.seen]
        assert revisions == list(range(1, 1 + 1 + 3 * 2))


async def test_an_upstream_that_keeps_failing_fails_the_job_and_a_rejection_fails_at_once() -> None:
    upstream = Upstream(
        fail_always={
            spec(1).media_id: TransientAnalyzerError("upstream 503"),
            spec(2).media_id: PermanentAnalyzerError("cannot decode", reason="IMAGE_UNDECODABLE"),
        }
    )
    async with service(upstream, workers=2) as running:
        await running.queue.submit([spec(1), spec(2)])
        hopeless, broken = await running.until(JobStatus.FAILED, 1, 2)
        assert (hopeless.attempt, reason(hopeless)) == (3, "ANALYZER_UNAVAILABLE")
        assert (broken.attempt, reason(broken)) == (1, "IMAGE_UNDECODABLE")
        assert (len(upstream.call_times(1)), len(upstream.call_times(2))) == (3, 1)


# ---- deferrals ----


async def test_a_quota_refusal_pauses_the_api_for_its_retry_delay_without_using_an_attempt() -> (
    None
):
    refusal = QuotaExceeded("quota exhausted", api=API, retry_after=7.0)
    upstream = Upstream(failures={spec(1).media_id: [refusal]})
    async with service(upstream, workers=2) as running:
        await running.queue.submit([spec(1)])
        await running.until(JobStatus.PROCESSING, 1)
        (deferred,) = await running.until(JobStatus.PENDING, 1)
        refused_at = loop_time()
        # Submitted during the pause: its call waits for the API too.
        await running.queue.submit([spec(2)])
        await running.until(JobStatus.COMPLETED, 1, 2)

        assert (deferred.attempt, deferred.next_attempt_at) == (0, deferred.event_time + 7.0)
        assert upstream.call_times(1)[1] >= refused_at + 7.0
        assert upstream.call_times(2) == [refused_at + 7.0]
        job = await running.get(1)
        assert job.attempt == 1
        assert [a.outcome for a in job.attempts] == ["QUOTA_EXCEEDED", "COMPLETED"]


async def test_jobs_wait_out_an_unreachable_ingest_without_using_attempts() -> None:
    ingest = Ingest(outages={spec(1).media_id: 4})
    upstream = Upstream()
    async with service(upstream, ingest=ingest) as running:
        await running.queue.submit([spec(1)])
        (done,) = await running.until(JobStatus.COMPLETED, 1)
        # Four refusals, one more than the job's attempts; each waits longer.
        assert gaps([at for _, at in ingest.reads]) == [1.0, 2.0, 4.0, 8.0]
        assert done.attempt == 1
        job = await running.get(1)
        assert [a.outcome for a in job.attempts] == ["CONTENT_UNAVAILABLE"] * 4 + ["COMPLETED"]


async def test_a_job_whose_bytes_stay_unreachable_fails_past_max_quota_deferrals() -> None:
    retry = replace(RETRY, max_quota_deferrals=2)
    async with service(Upstream(), ingest=Ingest(always=True), retry=retry) as running:
        await running.queue.submit([spec(1)])
        (failed,) = await running.until(JobStatus.FAILED, 1)
        assert reason(failed) == "CONTENT_UNAVAILABLE"
        assert len((await running.get(1)).attempts) == 3


# ---- leases ----


async def test_heartbeats_keep_a_long_analysis_and_a_crashed_workers_job_is_taken_over() -> None:
    lease = 3.0
    async with service(Upstream(duration=10.0), workers=2, lease=lease) as running:
        await running.queue.submit([spec(1)])
        # Another replica claims the job and crashes: nobody renews its lease.
        crashed = JobQueue(
            running.store,
            StatusHub(buffer_size=16, max_watchers=1),
            RETRY,
            lease,
            clock=LoopClock(),
        )
        assert await crashed.claim() is not None
        claimed_at = loop_time()
        await running.queue.submit([spec(2)])

        taken_over, kept = await running.until(JobStatus.COMPLETED, 1, 2)

        # The long analysis outlived its lease three times over, on its first attempt.
        assert kept.attempt == 1
        assert [a.outcome for a in (await running.get(2)).attempts] == ["COMPLETED"]
        # The crashed claim expired after its lease, then waited its backoff (1 s).
        assert taken_over.attempt == 2
        assert [a.outcome for a in (await running.get(1)).attempts] == [
            "LEASE_EXPIRED",
            "COMPLETED",
        ]
        (reaped,) = [e for e in running.seen if reason(e) == "LEASE_EXPIRED"]
        assert reaped.media_id == spec(1).media_id
        # The reaper runs every quarter of a lease.
        assert claimed_at + lease < reaped.event_time - EPOCH <= claimed_at + lease * 1.25


class RenewalsRefused(MemoryQueueStore):
    """A store this replica's lease renewals do not reach while ``refusing`` (a network
    partition that other replicas, and its reaper here, are on the right side of)."""

    refusing = True

    async def renew(self, job: ClaimedJob, lease_seconds: float) -> bool:
        if self.refusing:
            raise StorageUnavailable("connection to the database lost")
        return await super().renew(job, lease_seconds)


async def test_an_analysis_whose_lease_was_taken_over_is_stopped_at_the_next_renewal() -> None:
    lease = 3.0
    observer = EndedAttempts()
    upstream = Upstream(duration=50.0)
    async with service(upstream, lease=lease, observer=observer, store_type=RenewalsRefused) as (
        running
    ):
        assert isinstance(running.store, RenewalsRefused)
        await running.queue.submit([spec(1)])
        await running.until(JobStatus.PROCESSING, 1)
        (reaped,) = await running.until(JobStatus.PENDING, 1)
        assert reason(reaped) == "LEASE_EXPIRED"
        running.store.refusing = False
        healed_at = loop_time()
        (done,) = await running.until(JobStatus.COMPLETED, 1)

    # The first call is given up at the first renewal after the partition (renewals every
    # third of the lease), not left to run its 50 s for an outcome that would be dropped;
    # the worker is free for the job's second attempt at once.
    ((cancelled_id, cancelled_at),) = upstream.cancelled
    assert cancelled_id == spec(1).media_id
    assert healed_at < cancelled_at <= healed_at + lease / 3
    first, second = upstream.call_times(1)
    assert cancelled_at < second < first + upstream.duration
    assert done.attempt == 2
    assert [outcome for outcome, _ in observer.ended] == [
        AttemptOutcome.LEASE_LOST,
        AttemptOutcome.COMPLETED,
    ]


# ---- the analyser timeout beside the rate limit ----


async def test_waiting_for_the_rate_limit_does_not_count_against_the_analyser_timeout() -> None:
    # One call a second, three workers, calls of 0.4 s under a 0.5 s timeout, one attempt
    # each: the third job waits 2 s for its slot, yet only its call is timed.
    upstream = Upstream(duration=0.4, rate_per_second=1.0)
    retry = replace(RETRY, max_attempts=1)
    async with service(upstream, workers=3, retry=retry, analyzer_timeout=0.5) as running:
        await running.queue.submit([spec(n) for n in range(3)])
        await running.until(JobStatus.COMPLETED, 0, 1, 2)
        assert gaps(sorted(at for _, at in upstream.calls)) == [1.0, 1.0]


async def test_a_call_longer_than_the_analyser_timeout_is_a_failed_attempt() -> None:
    upstream = Upstream(duration=0.6)
    retry = replace(RETRY, max_attempts=2)
    async with service(upstream, retry=retry, analyzer_timeout=0.5) as running:
        await running.queue.submit([spec(1)])
        (failed,) = await running.until(JobStatus.FAILED, 1)
        assert (failed.attempt, reason(failed)) == (2, "ANALYSIS_TIMEOUT")


# ---- drain and pause ----


async def test_draining_gives_an_unfinished_job_back_without_using_an_attempt() -> None:
    async with service(Upstream(duration=100.0)) as running:
        await running.queue.submit([spec(1)])
        await running.until(JobStatus.PROCESSING, 1)
        started = loop_time()
        await running.pool.drain(5.0)
        assert loop_time() - started == 5.0
        job = await running.get(1)
        assert (job.status, job.attempt) == (JobStatus.PENDING, 0)
        assert [a.outcome for a in job.attempts] == ["RELEASED"]


async def test_a_paused_queue_holds_the_workers_until_it_is_resumed() -> None:
    upstream = Upstream()
    async with service(upstream) as running:
        await running.queue.set_paused(True)
        await running.queue.submit([spec(1)])
        await asyncio.sleep(600)
        assert upstream.calls == []
        await running.queue.set_paused(False)
        resumed = loop_time()
        await running.until(JobStatus.COMPLETED, 1)
        assert upstream.call_times(1) == [resumed]


# ---- the result cache ----


async def test_identical_content_is_analysed_once() -> None:
    upstream = Upstream(duration=1.0)
    copy = replace(spec(1), media_id=spec(2).media_id)
    async with service(upstream, workers=2) as running:
        await running.queue.submit([spec(1), copy])
        first, second = await running.until(JobStatus.COMPLETED, 1, 2)
        assert len(upstream.calls) == 1
        assert first.result is not None
        assert second.result is not None
        assert (first.result.reused, second.result.reused) == (False, True)


async def test_a_degraded_result_completes_its_job_only() -> None:
    """The analyser's fallback result is not cached: the copy that waited for its analysis
    analyses the content again (at once), and the next copy reuses that full result."""
    upstream = Upstream(duration=1.0, degraded=1)
    copy, later = (replace(spec(1), media_id=spec(n).media_id) for n in (2, 3))
    async with service(upstream, workers=2) as running:
        await running.queue.submit([spec(1), copy])
        done = await running.until(JobStatus.COMPLETED, 1, 2)
        await running.queue.submit([later])
        done += await running.until(JobStatus.COMPLETED, 3)

    assert [event.result and event.result.reused for event in done] == [False, False, True]
    assert gaps(sorted(at for _, at in upstream.calls)) == [upstream.duration]


async def test_identical_content_among_jobs_claimed_ahead_is_analysed_once() -> None:
    """Jobs started this fast are claimed ahead and looked up before they start (see
    domain/read_ahead.py): copies of one content among them still make one call."""
    upstream = Upstream()
    contents = 20
    copies = [replace(spec(n % contents), media_id=f"copy-{n:04d}") for n in range(200)]
    async with service(upstream, workers=4) as running:
        await running.queue.submit(copies)
        completed: list[StatusEvent] = []
        while len(completed) < len(copies):
            event = await running.watcher.next(HANG)
            assert event is not None, f"no change within {HANG:.0f} s of loop time"
            if event.status is JobStatus.COMPLETED:
                completed.append(event)
        assert len(upstream.calls) == contents
        reused = [event.result.reused for event in completed if event.result is not None]
        assert reused.count(False) == contents
        assert reused.count(True) == len(copies) - contents


async def test_a_cached_result_completes_its_job_while_ingest_is_unreachable() -> None:
    """The bytes are read while the cache is asked; a job the cache answers does not need
    them, so an unreachable ingest neither delays nor fails it."""
    upstream = Upstream()
    ingest = Ingest()
    copy = replace(spec(1), media_id=spec(2).media_id)
    async with service(upstream, ingest=ingest) as running:
        await running.queue.submit([spec(1)])
        await running.until(JobStatus.COMPLETED, 1)
        ingest.always = True
        await running.queue.submit([copy])
        (second,) = await running.until(JobStatus.COMPLETED, 2)
        assert second.result is not None
        assert second.result.reused
        assert second.attempt == 1
        # The copy's read, if it started before the cache answered, failed unheeded.
        assert ingest.read_ids[:1] == [spec(1).media_id]
        assert len(upstream.calls) == 1


class EndedAttempts(NoObserver):
    """Records each ended attempt's outcome at the loop's time."""

    def __init__(self) -> None:
        self.ended: list[tuple[AttemptOutcome, float]] = []

    def attempt_ended(self, outcome: AttemptOutcome, seconds: float, attempt: int) -> None:
        self.ended.append((outcome, loop_time()))


async def test_a_completion_written_behind_keeps_its_lease_and_is_reported_once_committed() -> None:
    """A watcher that does not read (the service's, here) holds each commit for the pacing
    bound, 60 s, past the 30 s lease: the claim, then the worker's completion, wait that long,
    the lease renewed meanwhile."""
    observer = EndedAttempts()
    async with service(Upstream(), pacing=60.0, observer=observer) as running:
        await running.queue.submit([spec(1)])
        await asyncio.sleep(119.0)
        job = await running.get(1)
        assert (job.status, observer.ended) == (JobStatus.PROCESSING, [])
        await asyncio.sleep(2.0)
        job = await running.get(1)
        assert (job.status, job.attempt) == (JobStatus.COMPLETED, 1)
        assert [a.outcome for a in job.attempts] == ["COMPLETED"]
        assert observer.ended == [(AttemptOutcome.COMPLETED, 120.0)]
