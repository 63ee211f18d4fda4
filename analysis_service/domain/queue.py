"""The durable job queue's rules: what each outcome of an attempt makes of the job.

The store applies each transition in one transaction with its event (see
:mod:`analysis_service.domain.store`). Claims take a lease (holder, expiry, fencing
token); heartbeats renew it; a reaper returns jobs whose lease expired to PENDING. A worker
that lost its lease cannot overwrite a newer outcome: every end of an attempt is fenced by
the token. Concurrent claims and concurrent ends are each grouped into one transaction.

The workers' frequent changes ride in as few transactions as they can without more
concurrency. A completion is written behind: the worker goes on once it is queued (at most
``MAX_PENDING_ENDS`` are; beyond, it waits), and learns its outcome from the future
:meth:`JobQueue.complete` returns. Their next jobs are claimed ahead, in batches that go with
those ends (:mod:`analysis_service.domain.claims`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Collection, Sequence
from typing import Any

from analysis_service.config import RetryPolicy
from analysis_service.domain.claims import RELEASED, Claims, ClaimsAhead, given_back
from analysis_service.domain.clock import SYSTEM_CLOCK, Clock
from analysis_service.domain.hub import StatusHub
from analysis_service.domain.models import (
    AttemptOutcome,
    ClaimedJob,
    Job,
    JobError,
    JobResult,
    JobSpec,
    JobStatus,
    StatusEvent,
)
from analysis_service.domain.store import (
    AttemptEnd,
    ExpiredLease,
    NewResult,
    QueueDepth,
    QueueStore,
)
from analysis_service.errors import JobNotFound, LeaseLost
from mediatag_common.errors import FieldViolation, listed
from mediatag_common.group_commit import GroupCommit

logger = logging.getLogger(__name__)

LEASE_EXPIRED = JobError("LEASE_EXPIRED", "the worker's lease expired (crashed or stalled)", True)
# Completions queued and not yet committed, at most (each holds its job's lease and result).
MAX_PENDING_ENDS = 128


class JobQueue:
    """Submit, claim, complete, fail, retry; pause and resume; wake idle workers."""

    def __init__(
        self,
        store: QueueStore,
        hub: StatusHub,
        retry: RetryPolicy,
        lease_seconds: float,
        *,
        delivery_pacing: float = 0.0,
        rng: random.Random | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._store = store
        self._hub = hub
        self._retry = retry
        self.lease_seconds = lease_seconds
        self._delivery_pacing = delivery_pacing
        # The backoff's jitter (a test seeds it to replay a schedule).
        self._rng = rng or random.Random()
        self._work_available = asyncio.Event()
        # Who holds this process's leases (in the job rows, for operators).
        self.holder = uuid.uuid4().hex[:12]
        self._claims = Claims(self._claim_batch, self._end, self._work_available.set, clock)
        self._ends: GroupCommit[AttemptEnd, StatusEvent | None] = GroupCommit(self._end_group)
        self._end_room = asyncio.Semaphore(MAX_PENDING_ENDS)
        # The last known state of the (cluster-wide) pause; the store is what claims obey.
        self.paused = False

    async def load(self) -> None:
        """Read the persisted state (current revision, paused flag) on start."""
        revision, _ = await self._store.log_bounds()
        self._hub.current_revision = max(self._hub.current_revision, revision)
        self.paused = await self._store.is_paused()

    # -- submission ------------------------------------------------------------------------

    async def submit(self, specs: Sequence[JobSpec]) -> tuple[list[str], list[str]]:
        """Enqueue new jobs; ids already known are left as they are. Returns (new, known)."""
        unique = list({spec.media_id: spec for spec in specs}.values())
        new_ids, known_ids = await self._store.submit(unique, max_attempts=self._retry.max_attempts)
        if new_ids:
            self._work_available.set()
        return new_ids, known_ids

    # -- claiming --------------------------------------------------------------------------

    async def claim(self) -> ClaimedJob | None:
        """Lease the next due job in queue order, or None (also while paused); one claimed
        ahead if there is one. Tops up the jobs claimed ahead (see :mod:`.claims`)."""
        return await self._claims.claim()

    def tell_claims_ahead(self, listener: ClaimsAhead) -> None:
        """Tell ``listener`` of every job claimed ahead, and of those given back unstarted."""
        self._claims.tell(listener)

    async def _claim_batch(self, count: int) -> Sequence[ClaimedJob]:
        # Claims and ends are the workers' frequent changes: they take turns with the
        # fan-out (StatusHub.paced).
        async with self._hub.paced(self._delivery_pacing):
            return await self._store.claim(self.holder, count, self.lease_seconds)

    async def wait_for_work(self, max_wait: float) -> None:
        """Sleep until a job may be due (submit, retry, resume, next backoff) or max_wait."""
        self._work_available.clear()
        timeout = max_wait
        self.paused = await self._store.is_paused()
        if not self.paused:
            due = await self._store.next_due_time()
            if due is not None:
                timeout = min(max_wait, max(0.0, due - self._store.now()))
        if timeout <= 0:
            return
        # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that arrives as the
        # event is set (CPython gh-86296), and a worker cancelled by a drain would run on.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._work_available.wait()

    def wake_workers(self) -> None:
        self._work_available.set()

    async def renew_lease(self, job: ClaimedJob) -> bool:
        """Extend the lease; False when it was lost (expired and reclaimed)."""
        return await self._store.renew(job, self.lease_seconds)

    # -- outcomes --------------------------------------------------------------------------

    async def complete(
        self,
        job: ClaimedJob,
        result: JobResult,
        result_key: str,
        *,
        new_result: NewResult | None = None,
    ) -> asyncio.Future[StatusEvent]:
        """Complete the job with the cached result ``result_key`` (stored by this transaction
        when it is a ``new_result``), written behind: returns once the completion is queued
        (waiting while MAX_PENDING_ENDS are). The future holds its COMPLETED event once
        committed; it raises LeaseLost when a newer claim holds the job (this worker was fenced
        out), or the storage's error. Keep the job's lease until then.
        """
        await self._end_room.acquire()
        end = AttemptEnd(
            job,
            JobStatus.COMPLETED,
            AttemptOutcome.COMPLETED,
            job.attempt,
            result=result,
            result_key=result_key,
            new_result=new_result,
        )
        written = self._ends.enqueue(end)
        ended: asyncio.Future[StatusEvent] = asyncio.get_running_loop().create_future()

        def settle(written: asyncio.Future[StatusEvent | None]) -> None:
            self._end_room.release()
            if written.cancelled():
                ended.cancel()
            elif (error := written.exception()) is not None:
                ended.set_exception(error)
            elif (event := written.result()) is None:
                ended.set_exception(lease_lost(job))
            else:
                ended.set_result(event)

        written.add_done_callback(settle)
        return ended

    async def fail_attempt(self, job: ClaimedJob, error: JobError) -> StatusEvent:
        """A failed attempt: retried with backoff if transient and attempts remain, else FAILED."""
        if error.transient and job.attempt < self._retry.max_attempts:
            return await self._end(
                AttemptEnd(
                    job,
                    JobStatus.PENDING,
                    AttemptOutcome.RETRY_SCHEDULED,
                    job.attempt,
                    error=error,
                    delay=self.backoff(job.attempt),
                )
            )
        return await self._end(
            AttemptEnd(job, JobStatus.FAILED, AttemptOutcome.FAILED, job.attempt, error=error)
        )

    async def defer(
        self, job: ClaimedJob, outcome: AttemptOutcome, error: JobError, delay: float
    ) -> StatusEvent:
        """Not the job's fault (quota, ingest unreachable): PENDING again after ``delay``.

        ``outcome`` says which deferral it is. The attempt does not count; past
        ``max_quota_deferrals`` such refusals the job FAILS.
        """
        if job.quota_deferrals >= self._retry.max_quota_deferrals:
            return await self._end(
                AttemptEnd(job, JobStatus.FAILED, AttemptOutcome.FAILED, job.attempt, error=error)
            )
        return await self._end(
            AttemptEnd(
                job,
                JobStatus.PENDING,
                outcome,
                job.attempt - 1,
                error=error,
                delay=delay,
                quota_deferrals=job.quota_deferrals + 1,
            )
        )

    async def release(self, job: ClaimedJob) -> StatusEvent:
        """Give a job back on shutdown: PENDING at once; the attempt does not count."""
        return await self._end(given_back(job, RELEASED))

    async def _end(self, end: AttemptEnd) -> StatusEvent:
        event = await self._ends.commit(end)
        if event is None:
            raise lease_lost(end.job)
        if event.status is JobStatus.PENDING:
            self._work_available.set()
        return event

    async def _end_group(self, ends: Sequence[AttemptEnd]) -> list[StatusEvent | None]:
        async with self._hub.paced(self._delivery_pacing):
            return await self._store.end_attempts(ends)

    def backoff(self, attempt: int) -> float:
        """Delay before the attempt after ``attempt``: base * 2^(attempt-1), with jitter."""
        policy = self._retry
        delay: float = min(policy.backoff_max, policy.backoff_base * 2.0 ** (attempt - 1))
        return delay * self._rng.uniform(1 - policy.jitter, 1 + policy.jitter)

    # -- recovery --------------------------------------------------------------------------

    def _expiry(self, lease: ExpiredLease) -> AttemptEnd:
        """An expired lease ends its attempt: retried after a backoff while attempts remain."""
        job = lease.job
        if job.attempt < lease.max_attempts:
            return AttemptEnd(
                job,
                JobStatus.PENDING,
                AttemptOutcome.LEASE_EXPIRED,
                job.attempt,
                error=LEASE_EXPIRED,
                delay=self.backoff(job.attempt),
            )
        return AttemptEnd(
            job, JobStatus.FAILED, AttemptOutcome.LEASE_EXPIRED, job.attempt, error=LEASE_EXPIRED
        )

    async def reap_expired_leases(self) -> list[StatusEvent]:
        """Return jobs whose lease expired to PENDING (or FAILED when out of attempts)."""
        events = await self._store.expire_leases(self._expiry)
        for event in events:
            logger.warning(
                "lease of media %s expired (attempt %d); now %s",
                event.media_id,
                event.attempt,
                event.status,
            )
        if events:
            self._work_available.set()
        return events

    async def retry(
        self,
        media_ids: Collection[str],
        *,
        owner_id: str = "",
        status: JobStatus = JobStatus.FAILED,
    ) -> list[str]:
        """Send FAILED (or COMPLETED, to reprocess) jobs back to PENDING with fresh attempts.

        With ids, every listed job in a terminal status is retried; unknown ids raise.
        """
        retried, missing = await self._store.retry(media_ids, owner_id=owner_id, status=status)
        if missing:
            raise JobNotFound(
                f"no job for media {listed(missing)}",
                field_violations=[FieldViolation("media_ids", f"unknown: {listed(missing)}")],
                metadata={"unknownCount": str(len(missing))},
            )
        if retried:
            self._work_available.set()
        return retried

    async def set_paused(self, paused: bool) -> None:
        """Pause or resume claiming on every replica sharing the database."""
        await self._store.set_paused(paused)
        self.paused = paused
        if not paused:
            self._work_available.set()
        else:
            await self._claims.give_back_ready()

    async def is_paused(self) -> bool:
        self.paused = await self._store.is_paused()
        return self.paused

    # -- reads -----------------------------------------------------------------------------

    async def get(self, media_id: str, *, with_embedding: bool) -> Job | None:
        return await self._store.get_job(media_id, with_embedding=with_embedding)

    async def owners_of(self, media_ids: Sequence[str]) -> dict[str, str]:
        """The owner of each known job of ``media_ids``; unknown ids are left out."""
        return await self._store.owners_of(media_ids)

    async def list(
        self,
        *,
        status: JobStatus | None,
        owner_id: str,
        error_reason: str,
        after: Sequence[Any] | None,
        limit: int,
        with_embedding: bool,
    ) -> list[Job]:
        return await self._store.list_jobs(
            status=status,
            owner_id=owner_id,
            error_reason=error_reason,
            after=after,
            limit=limit,
            with_embedding=with_embedding,
        )

    async def depth(self) -> QueueDepth:
        """Counts by status and the submission time of the oldest PENDING job."""
        return await self._store.depth()

    async def compact_events(self, *, max_age: float, max_events: int) -> int:
        return await self._store.compact(max_age=max_age, max_events=max_events)

    async def close(self) -> None:
        """Wait for grouped claims and ends under way (completions written behind among
        them) to be written; give back the jobs claimed ahead that no worker took."""
        await self._claims.close()
        await self._ends.close()


def lease_lost(job: ClaimedJob) -> LeaseLost:
    """The error of an attempt fenced out: a newer claim holds the job."""
    return LeaseLost(f"lease on media {job.spec.media_id} was lost")
