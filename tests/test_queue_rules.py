"""The queue's rules on a fake clock: attempts, backoff, deferrals, leases, fencing, pause,
revisions and pacing, each in milliseconds of real time.

The queue runs on the in-memory store (held to the SQL stores' contract by
tests/test_queue_store.py) and on the event loop's clock, which looptime fast-forwards:
``time_passes(30)`` moves the store's clock, the due times and the leases on by exactly 30 s.
The same rules through real servers are in test_pipeline.py and test_watch.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from analysis_service.config import RetryPolicy
from analysis_service.domain.claims import AHEAD_HORIZON, MAX_AHEAD, RATE_WINDOW, READY_TTL
from analysis_service.domain.hub import StatusHub, WatchFilter
from analysis_service.domain.models import (
    AttemptOutcome,
    ClaimedJob,
    Job,
    JobError,
    JobResult,
    JobStatus,
    StatusEvent,
)
from analysis_service.domain.queue import MAX_PENDING_ENDS, JobQueue
from analysis_service.domain.store import EventFilter
from analysis_service.errors import JobNotFound, LeaseLost
from analysis_service.storage.memory_store import MemoryQueueStore
from mediatag_common.errors import FieldViolation
from tests.queue_support import LoopClock, spec

pytestmark = pytest.mark.looptime

LEASE = 30.0
# Backoff 1 s, 2 s, 4 s... without jitter, so that due times are exact.
RETRY = RetryPolicy(max_attempts=3, backoff_base=1.0, backoff_max=60.0, jitter=0.0)
UNAVAILABLE = JobError("ANALYZER_UNAVAILABLE", "upstream 503", True)
REJECTED = JobError("ANALYZER_REJECTED", "cannot decode", False)
QUOTA = JobError("QUOTA_EXCEEDED", "quota", True)
RESULT = JobResult(("tag",), np.ones(4, dtype=np.float32), 4, "test", "1", reused=False)
RESULT_KEY = "k" * 64


@dataclass
class Queue:
    """A queue on an in-memory store, and every event it published, in order."""

    jobs: JobQueue
    store: MemoryQueueStore
    hub: StatusHub
    published: list[StatusEvent]

    async def claim(self) -> ClaimedJob:
        job = await self.jobs.claim()
        assert job is not None, "no job was due"
        return job

    async def get(self, number: int) -> Job:
        job = await self.store.get_job(spec(number).media_id, with_embedding=False)
        assert job is not None
        return job


def queue_of(
    retry: RetryPolicy = RETRY, *, pacing: float = 0.0, rng: random.Random | None = None
) -> Queue:
    hub = StatusHub(buffer_size=1024, max_watchers=100)
    published: list[StatusEvent] = []

    def publish(events: list[StatusEvent]) -> None:
        published.extend(events)
        hub.publish(events)

    clock = LoopClock()
    store = MemoryQueueStore(publish=publish, clock=clock)
    jobs = JobQueue(store, hub, retry, LEASE, delivery_pacing=pacing, rng=rng, clock=clock)
    return Queue(jobs, store, hub, published)


async def completed(queue: Queue, job: ClaimedJob) -> StatusEvent:
    """Complete ``job`` and wait for its completion (written behind) to commit."""
    return await (await queue.jobs.complete(job, RESULT, RESULT_KEY))


def loop_time() -> float:
    return asyncio.get_running_loop().time()


async def time_passes(seconds: float) -> None:
    """Move the (fake) clock on by ``seconds``."""
    await asyncio.sleep(seconds)


def delay_of(event: StatusEvent) -> float:
    assert event.next_attempt_at is not None, "no next attempt scheduled"
    return event.next_attempt_at - event.event_time


def outcomes(job: Job) -> list[tuple[int, str]]:
    return [(attempt.number, attempt.outcome) for attempt in job.attempts]


# ---- attempts and backoff ----


async def test_a_transient_failure_is_retried_after_a_doubling_backoff_until_attempts_run_out() -> (
    None
):
    queue = queue_of()
    await queue.jobs.submit([spec(1)])
    for attempt, backoff in ((1, 1.0), (2, 2.0)):
        job = await queue.claim()
        assert job.attempt == attempt
        event = await queue.jobs.fail_attempt(job, UNAVAILABLE)
        assert event.status is JobStatus.PENDING
        assert delay_of(event) == backoff
        await time_passes(backoff / 2)
        assert await queue.jobs.claim() is None, "claimed before its backoff ended"
        await time_passes(backoff / 2)

    last = await queue.claim()
    assert last.attempt == 3
    event = await queue.jobs.fail_attempt(last, UNAVAILABLE)
    assert (event.status, event.error, event.next_attempt_at) == (
        JobStatus.FAILED,
        UNAVAILABLE,
        None,
    )
    await time_passes(3600)
    assert await queue.jobs.claim() is None
    failed = await queue.get(1)
    assert outcomes(failed) == [(1, "RETRY_SCHEDULED"), (2, "RETRY_SCHEDULED"), (3, "FAILED")]
    assert {attempt.error for attempt in failed.attempts} == {UNAVAILABLE}


async def test_a_permanent_failure_fails_at_once_with_attempts_left() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(1)])
    event = await queue.jobs.fail_attempt(await queue.claim(), REJECTED)
    assert (event.status, event.attempt, event.error) == (JobStatus.FAILED, 1, REJECTED)
    assert outcomes(await queue.get(1)) == [(1, "FAILED")]


async def test_the_backoff_doubles_up_to_its_cap_and_its_jitter_replays_from_the_seed(
    seed: int,
) -> None:
    policy = RetryPolicy(max_attempts=10, backoff_base=1.0, backoff_max=8.0, jitter=0.2)
    queue = queue_of(policy, rng=random.Random(seed)).jobs
    delays = [queue.backoff(n) for n in range(1, 9)]
    nominal = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    for delay, expected in zip(delays, nominal, strict=True):
        assert expected * 0.8 <= delay <= expected * 1.2, (delays, nominal)
    # Jittered: retries of jobs that failed together spread out.
    assert len({delay / expected for delay, expected in zip(delays, nominal, strict=True)}) > 1
    replayed = queue_of(policy, rng=random.Random(seed)).jobs
    assert [replayed.backoff(n) for n in range(1, 9)] == delays


# ---- deferrals ----


async def test_a_quota_deferral_waits_its_delay_without_using_an_attempt() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(1)])
    refused = await queue.claim()
    event = await queue.jobs.defer(refused, AttemptOutcome.QUOTA_DEFERRED, QUOTA, 7.0)
    assert (event.status, event.attempt, delay_of(event)) == (JobStatus.PENDING, 0, 7.0)

    await time_passes(6.5)
    assert await queue.jobs.claim() is None, "claimed before the API's retry delay"
    await time_passes(0.5)
    job = await queue.claim()
    assert (job.attempt, job.quota_deferrals) == (1, 1)
    await queue.store.store_result(RESULT_KEY, "f" * 64, RESULT, holder=None)
    await completed(queue, job)
    stored = await queue.get(1)
    assert (stored.status, stored.attempt) == (JobStatus.COMPLETED, 1)
    assert outcomes(stored) == [(1, "QUOTA_EXCEEDED"), (1, "COMPLETED")]


async def test_a_job_put_off_more_than_max_quota_deferrals_times_fails() -> None:
    queue = queue_of(RetryPolicy(max_quota_deferrals=2))
    await queue.jobs.submit([spec(1)])
    for _ in range(2):
        event = await queue.jobs.defer(
            await queue.claim(), AttemptOutcome.CONTENT_DEFERRED, QUOTA, 1.0
        )
        assert event.status is JobStatus.PENDING
        await time_passes(1.0)
    event = await queue.jobs.defer(await queue.claim(), AttemptOutcome.CONTENT_DEFERRED, QUOTA, 1.0)
    assert (event.status, event.error) == (JobStatus.FAILED, QUOTA)


async def test_a_released_job_is_claimable_at_once_without_using_an_attempt() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(1)])
    event = await queue.jobs.release(await queue.claim())
    assert (event.status, event.attempt, event.error) == (JobStatus.PENDING, 0, None)
    job = await queue.claim()
    assert (job.attempt, job.lease_token) == (1, 2)
    (released, running) = (await queue.get(1)).attempts
    assert (released.outcome, running.outcome) == ("RELEASED", "RUNNING")
    assert released.error is not None
    assert released.error.reason == "RELEASED"


# ---- leases and fencing ----


async def test_an_expired_lease_returns_the_job_after_a_backoff_and_counts_the_attempt() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(1)])
    await queue.claim()
    await time_passes(LEASE)
    assert await queue.jobs.reap_expired_leases() == [], "reaped before its lease ran out"
    await time_passes(0.5)
    (event,) = await queue.jobs.reap_expired_leases()
    assert (event.status, event.attempt, delay_of(event)) == (JobStatus.PENDING, 1, 1.0)
    assert event.error is not None
    assert event.error.reason == "LEASE_EXPIRED"
    assert await queue.jobs.reap_expired_leases() == [], "one expiry reaped twice"

    await time_passes(1.0)
    job = await queue.claim()
    assert (job.attempt, job.lease_token) == (2, 2)
    assert outcomes(await queue.get(1)) == [(1, "LEASE_EXPIRED"), (2, "RUNNING")]


async def test_an_expired_lease_on_the_last_attempt_fails_the_job() -> None:
    queue = queue_of(RetryPolicy(max_attempts=1))
    await queue.jobs.submit([spec(1)])
    await queue.claim()
    await time_passes(LEASE + 1)
    (event,) = await queue.jobs.reap_expired_leases()
    assert event.status is JobStatus.FAILED
    assert event.error is not None
    assert event.error.reason == "LEASE_EXPIRED"


async def test_a_renewed_lease_outlives_its_length() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(1)])
    job = await queue.claim()
    for _ in range(4):
        await time_passes(LEASE * 2 / 3)
        assert await queue.jobs.renew_lease(job)
        assert await queue.jobs.reap_expired_leases() == []
    assert (await queue.get(1)).status is JobStatus.PROCESSING


async def test_a_late_outcome_after_the_lease_was_taken_over_changes_nothing() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(1)])
    stale = await queue.claim()
    await time_passes(LEASE + 1)
    await queue.jobs.reap_expired_leases()
    await time_passes(1.0)
    current = await queue.claim()
    before = (await queue.get(1), len(queue.published))

    await queue.store.store_result(RESULT_KEY, "f" * 64, RESULT, holder=None)
    with pytest.raises(LeaseLost):
        await completed(queue, stale)
    with pytest.raises(LeaseLost):
        await queue.jobs.fail_attempt(stale, REJECTED)
    with pytest.raises(LeaseLost):
        await queue.jobs.release(stale)
    assert not await queue.jobs.renew_lease(stale)

    assert (await queue.get(1), len(queue.published)) == before
    await completed(queue, current)
    job = await queue.get(1)
    assert (job.status, job.attempt) == (JobStatus.COMPLETED, 2)


# ---- pause, order and waking ----


async def test_a_pause_holds_claims_on_every_queue_of_the_store_until_resumed() -> None:
    queue = queue_of()
    replica = JobQueue(
        queue.store, StatusHub(buffer_size=16, max_watchers=1), RETRY, LEASE, clock=LoopClock()
    )
    await replica.set_paused(True)
    await queue.jobs.submit([spec(1)])
    idle = asyncio.create_task(queue.jobs.wait_for_work(max_wait=600))
    await time_passes(60)
    assert await queue.jobs.claim() is None
    assert await queue.jobs.is_paused()
    assert not idle.done(), "a paused queue's worker woke for a job it may not claim"

    await queue.jobs.set_paused(False)
    resumed = loop_time()
    await idle
    assert loop_time() == resumed, "resuming did not wake the idle worker"
    assert not await replica.is_paused()
    assert (await replica.claim()) is not None


async def test_an_idle_worker_wakes_when_a_job_is_submitted_or_its_retry_is_due() -> None:
    queue = queue_of()
    idle = asyncio.create_task(queue.jobs.wait_for_work(max_wait=600))
    await time_passes(10)
    await queue.jobs.submit([spec(1)])
    submitted = loop_time()
    await idle
    assert loop_time() == submitted

    await queue.jobs.fail_attempt(await queue.claim(), UNAVAILABLE)
    failed = loop_time()
    await queue.jobs.wait_for_work(max_wait=600)
    assert loop_time() - failed == 1.0
    assert await queue.jobs.claim() is not None


async def test_claims_follow_priority_then_submission_order() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(1)])
    await time_passes(1)
    await queue.jobs.submit([spec(2, priority=5), spec(3)])
    claimed = [(await queue.claim()).spec.media_id for _ in range(3)]
    assert claimed == [spec(2).media_id, spec(1).media_id, spec(3).media_id]


async def test_retry_brings_failed_jobs_back_with_fresh_attempts_and_refuses_unknown_ids() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(1)])
    await queue.jobs.fail_attempt(await queue.claim(), REJECTED)
    published = len(queue.published)

    with pytest.raises(JobNotFound) as refused:
        await queue.jobs.retry([spec(1).media_id, "unknown"])
    assert refused.value.reason == "JOB_NOT_FOUND"
    assert refused.value.field_violations == (FieldViolation("media_ids", "unknown: unknown"),)
    assert (await queue.get(1)).status is JobStatus.FAILED
    assert len(queue.published) == published, "a refused retry changed something"

    assert await queue.jobs.retry([spec(1).media_id]) == [spec(1).media_id]
    job = await queue.get(1)
    assert (job.status, job.attempt, job.error) == (JobStatus.PENDING, 0, None)
    assert (await queue.claim()).attempt == 1


# ---- revisions ----


async def test_every_change_has_the_next_revision_in_commit_order() -> None:
    queue = queue_of(RetryPolicy(max_attempts=2, jitter=0.0))
    watcher = queue.hub.subscribe(WatchFilter())
    await queue.jobs.submit([spec(n) for n in range(6)])
    # Claims at once share one grouped commit, as ends do.
    claimed = await asyncio.gather(*(queue.jobs.claim() for _ in range(6)))
    first, second, third, *rest = [job for job in claimed if job is not None]
    await queue.store.store_result(RESULT_KEY, "f" * 64, RESULT, holder=None)
    await asyncio.gather(
        completed(queue, first),
        queue.jobs.fail_attempt(second, REJECTED),
        queue.jobs.fail_attempt(third, UNAVAILABLE),
        queue.jobs.release(rest[0]),
    )
    await time_passes(LEASE + 1)
    await queue.jobs.reap_expired_leases()
    await queue.jobs.retry([second.spec.media_id])

    revisions = [event.revision for event in queue.published]
    assert revisions == list(range(1, len(revisions) + 1))
    assert len(revisions) == 6 + 6 + 4 + 2 + 1
    logged = await queue.store.events_after(0, EventFilter(), limit=100, with_embedding=False)
    assert [(e.revision, e.media_id, e.status) for e in logged] == [
        (e.revision, e.media_id, e.status) for e in queue.published
    ]
    seen = []
    while (event := await watcher.next(0)) is not None:
        seen.append(event.revision)
    assert seen == revisions


# ---- pacing with the watch fan-out ----


async def test_a_claim_waits_until_the_watchers_have_taken_the_changes_before_it() -> None:
    queue = queue_of(pacing=5.0)
    watcher = queue.hub.subscribe(WatchFilter())
    await queue.jobs.submit([spec(1), spec(2)])
    claiming = asyncio.create_task(queue.jobs.claim())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not claiming.done(), "a claim went ahead of the fan-out before it"

    started = loop_time()
    while await watcher.next(0) is not None:
        pass
    assert await claiming is not None
    assert loop_time() == started


async def test_a_watcher_that_does_not_read_holds_a_claim_no_longer_than_the_pacing_bound() -> None:
    queue = queue_of(pacing=5.0)
    queue.hub.subscribe(WatchFilter())
    await queue.jobs.submit([spec(1)])
    started = loop_time()
    assert await queue.jobs.claim() is not None
    assert loop_time() - started == 5.0


# ---- claims ahead and completions written behind ----


# Jobs submitted by the tests of claims ahead, and claimed by their workers: 10 of them.
SUBMITTED = 20


async def processing(queue: Queue) -> int:
    return (await queue.store.depth()).counts.get(JobStatus.PROCESSING, 0)


async def claimed_and_given_back(queue: Queue, claimed: list[ClaimedJob]) -> list[Job]:
    """The jobs that were claimed (ahead) but are none of ``claimed``: given back."""
    held = {job.spec.media_id for job in claimed}
    jobs = [await queue.get(number) for number in range(SUBMITTED)]
    return [job for job in jobs if job.spec.media_id not in held and job.attempts]


def assert_given_back_unstarted(job: Job) -> None:
    """``job``'s attempts tell a user it was claimed ahead and never started: the attempt did
    not count, and its error is not a worker's that stopped."""
    assert (job.status, job.attempt, outcomes(job)) == (JobStatus.PENDING, 0, [(1, "RELEASED")])
    error = job.attempts[0].error
    assert error is not None
    assert (error.reason, error.transient) == ("NOT_STARTED", True)
    assert error.message.startswith("claimed ahead by this replica but not started")


async def test_jobs_are_claimed_ahead_at_the_rate_the_workers_start_them() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(n) for n in range(1000)])
    for _ in range(4):
        await queue.claim()
        await time_passes(1.0)
    assert await processing(queue) == 4, "claimed ahead of workers that start a job a second"

    for _ in range(10):
        await queue.claim()
    await time_passes(0.001)
    # 10 starts in RATE_WINDOW: what they would start within AHEAD_HORIZON is claimed too.
    ahead = int(10 * AHEAD_HORIZON / RATE_WINDOW)
    assert await processing(queue) == 4 + 10 + ahead

    # Past the rate where MAX_AHEAD would be started within AHEAD_HORIZON: no more.
    fast = int(MAX_AHEAD * RATE_WINDOW / AHEAD_HORIZON) + 10
    for _ in range(fast):
        await queue.claim()
    await time_passes(0.001)
    assert await processing(queue) == 4 + 10 + fast + MAX_AHEAD


async def test_a_job_claimed_ahead_that_no_worker_starts_goes_back_without_using_an_attempt() -> (
    None
):
    queue = queue_of()
    await queue.jobs.submit([spec(n) for n in range(SUBMITTED)])
    claimed = [await queue.claim() for _ in range(10)]
    await time_passes(READY_TTL - 0.01)
    assert await processing(queue) > len(claimed)

    await time_passes(0.02)
    assert await processing(queue) == len(claimed)
    given_back = await claimed_and_given_back(queue, claimed)
    assert given_back
    for job in given_back:
        assert_given_back_unstarted(job)
        # A watcher saw the claim and the give-back: PROCESSING, then PENDING with the
        # attempt number back and no error (the job has none; only its attempt says why).
        seen = [
            (event.status, event.attempt, event.error)
            for event in queue.published
            if event.media_id == job.spec.media_id
        ]
        assert seen == [
            (JobStatus.PENDING, 0, None),
            (JobStatus.PROCESSING, 1, None),
            (JobStatus.PENDING, 0, None),
        ]


async def test_completions_are_written_behind_up_to_a_bound_then_the_worker_waits() -> None:
    queue = queue_of(pacing=5.0)
    await queue.jobs.submit([spec(n) for n in range(MAX_PENDING_ENDS + 1)])
    jobs = [await queue.claim() for _ in range(MAX_PENDING_ENDS + 1)]
    await time_passes(READY_TTL)
    # A watcher that does not read holds each group of ends for the pacing bound (5 s).
    queue.hub.subscribe(WatchFilter())
    await queue.jobs.submit([spec(1000)])
    started = loop_time()

    pending = [await queue.jobs.complete(job, RESULT, RESULT_KEY) for job in jobs[:-1]]
    assert loop_time() == started, "a completion waited with room behind"
    assert not any(completion.done() for completion in pending)
    last = await queue.jobs.complete(jobs[-1], RESULT, RESULT_KEY)
    assert loop_time() == started + 5.0, "the completion beyond the bound did not wait"

    await asyncio.gather(*pending, last)
    assert (await queue.get(MAX_PENDING_ENDS)).status is JobStatus.COMPLETED


async def test_closing_writes_the_completions_behind_and_gives_back_the_jobs_claimed_ahead() -> (
    None
):
    queue = queue_of()
    await queue.jobs.submit([spec(n) for n in range(SUBMITTED)])
    claimed = [await queue.claim() for _ in range(10)]
    await time_passes(0.001)
    assert await processing(queue) > len(claimed)
    pending = [await queue.jobs.complete(job, RESULT, RESULT_KEY) for job in claimed[:3]]

    await queue.jobs.close()
    assert all(completion.done() for completion in pending)
    counts = (await queue.store.depth()).counts
    # The jobs the workers hold are theirs to finish or release (the pool drains them).
    assert (counts[JobStatus.COMPLETED], counts[JobStatus.PROCESSING]) == (3, 7)
    assert counts[JobStatus.PENDING] == SUBMITTED - 10
    given_back = await claimed_and_given_back(queue, claimed)
    assert given_back
    for job in given_back:
        assert_given_back_unstarted(job)


class SlowToForget:
    """Told of the jobs claimed ahead and given back; each telling of a give-back takes a
    second (the read-ahead drops its claims on their content in a round trip)."""

    def __init__(self) -> None:
        self.telling = asyncio.Event()

    def claimed_ahead(self, job: ClaimedJob) -> None:
        pass

    async def given_back(self, jobs: Sequence[ClaimedJob]) -> None:
        self.telling.set()
        await time_passes(1.0)


async def test_closing_while_a_give_back_is_under_way_still_gives_back_every_job() -> None:
    queue = queue_of()
    listener = SlowToForget()
    queue.jobs.tell_claims_ahead(listener)
    await queue.jobs.submit([spec(n) for n in range(SUBMITTED)])
    claimed = [await queue.claim() for _ in range(10)]
    # No worker starts the jobs claimed ahead: after READY_TTL they go back, slowly.
    await asyncio.wait_for(listener.telling.wait(), READY_TTL + 1.0)

    await queue.jobs.close()
    assert await processing(queue) == len(claimed)
    for job in await claimed_and_given_back(queue, claimed):
        assert_given_back_unstarted(job)


async def test_a_pause_gives_back_the_jobs_claimed_ahead() -> None:
    queue = queue_of()
    await queue.jobs.submit([spec(n) for n in range(SUBMITTED)])
    claimed = [await queue.claim() for _ in range(10)]
    await time_passes(0.001)
    assert await processing(queue) > len(claimed)

    await queue.jobs.set_paused(True)
    assert await processing(queue) == len(claimed)
    assert await queue.jobs.claim() is None, "a job claimed ahead was started while paused"
    for job in await claimed_and_given_back(queue, claimed):
        assert_given_back_unstarted(job)
