"""The result cache's single flight when an analysis takes long: a job whose content another
job or replica is analysing waits for that result without its analyser timeout running and
without using an attempt (its lease kept by its heartbeat); the holder keeps its claim on the
key while it works, rate-limit waits included; a dead holder's claim lapses within one lease
and a waiting job takes the key over.

First on a fake clock (the in-memory store, replicas sharing it), then on real SQLite (one
process: the waiting is in-process) and PostgreSQL (two replicas, as ``server`` wires them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace

import pytest

from analysis_service.config import RetryPolicy, WatchConfig
from analysis_service.domain.cache import OTHER_HOLDER_POLL, ResultCache
from analysis_service.domain.clock import SYSTEM_CLOCK, Clock
from analysis_service.domain.hub import StatusHub, WatchFilter
from analysis_service.domain.limits import RateLimits
from analysis_service.domain.maintenance import Maintenance
from analysis_service.domain.models import Job, JobSpec, JobStatus
from analysis_service.domain.observer import NoObserver
from analysis_service.domain.queue import JobQueue
from analysis_service.domain.stats import Throughput
from analysis_service.domain.store import QueueStore
from analysis_service.domain.workers import WorkerPool
from analysis_service.storage.memory_store import MemoryQueueStore
from analysis_service.storage.queue_store import SqlQueueStore
from analysis_service.storage.rate_limits import DatabaseSlots
from analysis_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from analysis_service.storage.tailer import EventTailer
from mediatag_common.database import SQLITE, Database
from tests.conftest import DatabaseUrls, wait_until
from tests.queue_support import Ingest, LoopClock, spec
from tests.test_worker_rules import API, HANG, Upstream, loop_time

# The job lease, which is also the lease of a claim on a key (as server wires them).
LEASE = 3.0
# Shorter than the lease, so that a waiter under it would time out before a dead holder's
# claim lapses, and far shorter than the API's pause.
TIMEOUT = 1.0
RETRY = RetryPolicy(max_attempts=2, backoff_base=1.0, backoff_max=60.0, jitter=0.0)


def copy_of(number: int) -> JobSpec:
    """Another media item with the same content as ``spec(number)``."""
    return replace(spec(number), media_id=f"copy-of-{number}")


@dataclass
class Replica:
    """One analysis process's domain on a shared store."""

    store: QueueStore
    queue: JobQueue
    limits: RateLimits
    cache: ResultCache


@asynccontextmanager
async def replica(
    store: QueueStore,
    hub: StatusHub,
    upstream: Upstream,
    limits: RateLimits,
    *,
    workers: int = 1,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[Replica]:
    """Workers, reaper and cache wired as ``server`` wires them, started."""
    queue = JobQueue(store, hub, RETRY, LEASE, clock=clock)
    await queue.load()
    cache = ResultCache(
        store,
        analyzer_name=upstream.name,
        analyzer_version=upstream.version,
        claim_seconds=LEASE,
    )
    pool = WorkerPool(
        queue=queue,
        analyzer=upstream,
        limits=limits,
        cache=cache,
        content=Ingest(),
        size=workers,
        analyzer_timeout=TIMEOUT,
        throughput=Throughput(),
        observer=NoObserver(),
        clock=clock,
    )
    maintenance = Maintenance(queue, WatchConfig(), clock)
    pool.start()
    maintenance.start()
    try:
        yield Replica(store, queue, limits, cache)
    finally:
        await maintenance.stop()
        await pool.drain(0.0)
        await queue.close()


def outcomes(job: Job) -> list[str]:
    return [attempt.outcome for attempt in job.attempts]


async def until_terminal(store: QueueStore, hub: StatusHub, specs: Sequence[JobSpec]) -> list[Job]:
    """The jobs of ``specs`` once each is terminal (waiting on a watcher of the fake clock)."""
    watcher = hub.subscribe(WatchFilter())
    jobs: list[Job] = []
    for item in specs:
        while True:
            job = await store.get_job(item.media_id, with_embedding=False)
            assert job is not None
            if job.status.terminal:
                jobs.append(job)
                break
            assert await watcher.next(HANG) is not None, f"no change in {HANG:.0f} s"
    watcher.close()
    return jobs


# ---- on a fake clock ----


@pytest.mark.looptime
@pytest.mark.parametrize("shared", [True, False], ids=["two-replicas", "one-process"])
async def test_a_copy_waits_out_its_contents_analysis_held_up_by_a_paused_api(
    shared: bool,
) -> None:
    """The API is paused for 20 s (a quota error), far past the analyser timeout and the
    lease: the analysis of the content waits for it (not counted against its timeout), its
    claim on the key kept by renewals; the copy waits for it as long (nor counted against its
    own), its lease kept by its heartbeat, and reuses its result on its first attempt."""
    pause = 20.0
    clock = LoopClock()
    hub = StatusHub(buffer_size=1024, max_watchers=10)
    store = MemoryQueueStore(publish=hub.publish, clock=clock, shared=shared)
    upstream = Upstream()
    async with AsyncExitStack() as stack:
        # Two replicas of one worker each (which takes the key is theirs to settle), or one
        # of two workers.
        processes = [
            await stack.enter_async_context(
                replica(
                    store,
                    hub,
                    upstream,
                    RateLimits(upstream.api_limits, {}, clock=clock),
                    workers=workers,
                    clock=clock,
                )
            )
            for workers in ([1, 1] if shared else [2])
        ]
        for process in processes:
            # On PostgreSQL a quota error pauses the API for every replica.
            await process.limits.quota_exceeded(API, pause)
        await processes[0].queue.submit([spec(1), copy_of(1)])

        if shared:
            # Past three leases of the claim, another process is still refused the key.
            await asyncio.sleep(3 * LEASE + 1.0)
            key = processes[0].cache.key(spec(1).sha256, {})
            assert await store.take_analyses([key], "another", LEASE) == [False]
        jobs = await until_terminal(store, hub, [spec(1), copy_of(1)])

    assert [job.status for job in jobs] == [JobStatus.COMPLETED] * 2
    assert [outcomes(job) for job in jobs] == [["COMPLETED"]] * 2
    assert [at for _, at in upstream.calls] == [pause]
    assert sorted(bool(job.result and job.result.reused) for job in jobs) == [False, True]


@pytest.mark.looptime
async def test_a_dead_holders_claim_lapses_within_one_lease_and_the_waiting_job_takes_over() -> (
    None
):
    """A replica that claimed the key died: the job with that content waits one claim lease
    (not timed out, its lease kept), then analyses it itself, on its first attempt."""
    clock = LoopClock()
    hub = StatusHub(buffer_size=1024, max_watchers=10)
    store = MemoryQueueStore(publish=hub.publish, clock=clock, shared=True)
    upstream = Upstream()
    async with replica(
        store, hub, upstream, RateLimits(upstream.api_limits, {}, clock=clock), clock=clock
    ) as process:
        key = process.cache.key(spec(1).sha256, {})
        assert await store.take_analyses([key], "dead-replica", LEASE) == [True]
        claimed_at = loop_time()
        await process.queue.submit([spec(1)])
        (job,) = await until_terminal(store, hub, [spec(1)])

    assert (job.status, outcomes(job)) == (JobStatus.COMPLETED, ["COMPLETED"])
    assert job.result is not None
    assert not job.result.reused
    # Taken over at the first look after the claim lapsed.
    (called_at,) = upstream.call_times(1)
    assert claimed_at + LEASE < called_at <= claimed_at + LEASE + OTHER_HOLDER_POLL


@pytest.mark.looptime
async def test_a_degraded_result_lets_the_copy_waiting_in_another_replica_analyse_at_once() -> None:
    """The analyser's fallback result is not stored: its holder drops its claim on the key,
    and the copy waiting in the other replica takes it at its next look (not a lease later),
    then analyses the content on its first attempt."""
    clock = LoopClock()
    hub = StatusHub(buffer_size=1024, max_watchers=10)
    store = MemoryQueueStore(publish=hub.publish, clock=clock, shared=True)
    upstream = Upstream(duration=TIMEOUT / 2, degraded=1)
    async with AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(
                replica(
                    store,
                    hub,
                    upstream,
                    RateLimits(upstream.api_limits, {}, clock=clock),
                    clock=clock,
                )
            )
            for _ in range(2)
        ]
        await processes[0].queue.submit([spec(1), copy_of(1)])
        jobs = await until_terminal(store, hub, [spec(1), copy_of(1)])

    assert [outcomes(job) for job in jobs] == [["COMPLETED"]] * 2
    assert [bool(job.result and job.result.reused) for job in jobs] == [False, False]
    first, second = sorted(at for _, at in upstream.calls)
    assert first + upstream.duration < second <= first + upstream.duration + OTHER_HOLDER_POLL


# ---- on real databases ----


@asynccontextmanager
async def database_replica(url: str, upstream: Upstream, *, workers: int) -> AsyncIterator[Replica]:
    """A replica on its own connections to ``url``, its rate limits in the database when
    several share it (PostgreSQL), its changes followed by a tailer there."""
    db = Database(url)
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    hub = StatusHub(buffer_size=1024, max_watchers=10)
    tailer = None if db.dialect == SQLITE else EventTailer(db, publish=hub.publish)
    store = SqlQueueStore(db, committed=hub.publish if tailer is None else tailer.committed)
    limits = RateLimits(upstream.api_limits, {}, None if tailer is None else DatabaseSlots(db))
    try:
        async with replica(store, hub, upstream, limits, workers=workers) as running:
            if tailer is not None:
                tailer.start(hub.current_revision, running.queue.wake_workers)
            yield running
    finally:
        if tailer is not None:
            await tailer.stop()
        await db.close()


async def terminal_jobs(replica: Replica, specs: Sequence[JobSpec]) -> list[Job]:
    """The jobs of ``specs`` once all are terminal (waiting on the condition)."""
    jobs: list[Job] = []

    async def all_terminal() -> bool:
        found = [await replica.queue.get(item.media_id, with_embedding=False) for item in specs]
        jobs[:] = [job for job in found if job is not None and job.status.terminal]
        return len(jobs) == len(specs)

    await wait_until(all_terminal)
    return jobs


async def test_a_copy_waits_out_a_slow_analysis_of_its_content_on_real_databases(
    databases: DatabaseUrls,
) -> None:
    """As on the fake clock: the API paused past the analyser timeout plus the lease (what
    an unrenewed claim lasted), the content is analysed once and neither job uses a second
    attempt; on PostgreSQL the copy waits in another replica, on SQLite in the same one."""
    pause = 2 * (TIMEOUT + LEASE)
    url = databases.new("single-flight")
    upstream = Upstream()
    shared = databases.kind != SQLITE
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            database_replica(url, upstream, workers=1 if shared else 2)
        )
        # On PostgreSQL the pause is in the database: every replica's.
        await first.limits.quota_exceeded(API, pause)
        # When the pause ends, on the clock the store stamps the attempts with (the
        # database's on PostgreSQL): the one both are read on.
        (limit,) = await first.limits.snapshot()
        assert limit.throttled_until is not None
        if shared:
            await stack.enter_async_context(database_replica(url, upstream, workers=1))
        await first.queue.submit([spec(1), copy_of(1)])
        jobs = await terminal_jobs(first, [spec(1), copy_of(1)])

    assert [job.status for job in jobs] == [JobStatus.COMPLETED] * 2
    assert [outcomes(job) for job in jobs] == [["COMPLETED"]] * 2
    assert len(upstream.calls) == 1
    # Analysed once the pause was over.
    ended = [attempt.ended_at for job in jobs for attempt in job.attempts]
    assert all(at is not None and at >= limit.throttled_until for at in ended), ended
    assert sorted(bool(job.result and job.result.reused) for job in jobs) == [False, True]


async def test_a_dead_replicas_claim_is_taken_over_on_postgresql(postgres_url: str) -> None:
    """A replica that claimed the key died: the other replica's job with that content takes
    the key over once the claim lapses, on its first attempt."""
    upstream = Upstream()
    async with database_replica(postgres_url, upstream, workers=1) as running:
        key = running.cache.key(spec(1).sha256, {})
        claimed_at = time.monotonic()
        # What the dead replica left: its claim, which nobody renews.
        assert await running.store.take_analyses([key], "dead-replica", LEASE) == [True]
        await running.queue.submit([spec(1)])
        (job,) = await terminal_jobs(running, [spec(1)])

    assert (job.status, outcomes(job)) == (JobStatus.COMPLETED, ["COMPLETED"])
    assert job.result is not None
    assert not job.result.reused
    # Not before the claim lapsed (on the database's clock, this machine's too).
    (called_at,) = upstream.call_times(1)
    assert called_at >= claimed_at + LEASE - 0.1
