"""The durable job queue: every transition is one transaction that also appends its event.

Claims take a lease (worker id, expiry, fencing token); heartbeats renew it; a reaper
returns jobs whose lease expired to PENDING. A worker that lost its lease cannot overwrite
a newer outcome: completion and failure are fenced by the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from analysis_service.config import RetryPolicy
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
from analysis_service.errors import JobNotFound, LeaseLost
from analysis_service.storage import events as event_log
from analysis_service.storage import jobs as job_store
from analysis_service.storage import schema
from analysis_service.storage.session import read, write
from mediatag_common.database import Database, after_commit
from mediatag_common.errors import FieldViolation, listed

logger = logging.getLogger(__name__)

LEASE_EXPIRED = JobError("LEASE_EXPIRED", "the worker's lease expired (crashed or stalled)", True)


@dataclass(frozen=True)
class _Draft:
    """An event before it has its revision."""

    media_id: str
    owner_id: str
    status: JobStatus
    previous_status: JobStatus | None
    attempt: int
    result: JobResult | None = None
    result_key: str | None = None
    error: JobError | None = None
    next_attempt_at: float | None = None


class JobQueue:
    """Submit, claim, complete, fail, retry; pause and resume; wake idle workers."""

    def __init__(
        self,
        db: Database,
        hub: StatusHub,
        retry: RetryPolicy,
        lease_seconds: float,
        *,
        delivery_pacing: float = 0.0,
    ) -> None:
        self._db = db
        self._hub = hub
        self._retry = retry
        self.lease_seconds = lease_seconds
        self._delivery_pacing = delivery_pacing
        self._work_available = asyncio.Event()
        self.paused = False

    async def load(self) -> None:
        """Read the persisted state (current revision, paused flag) on start."""

        def counters(conn: Connection) -> tuple[int, int]:
            return (
                event_log.read_counter(conn, schema.REVISION),
                event_log.read_counter(conn, schema.PAUSED),
            )

        self._hub.current_revision, paused = await read(self._db, counters)
        self.paused = bool(paused)

    # -- transactions --------------------------------------------------------------------
    #
    # Each transaction is a function of a synchronous connection, run whole on the database
    # thread. Its clock is read inside it, under the single writer: event times follow
    # revisions.

    def _record(self, conn: Connection, drafts: Sequence[_Draft], now: float) -> list[StatusEvent]:
        """Append the events of this transaction and publish them once it commits."""
        if not drafts:
            return []
        first = event_log.allocate_revisions(conn, len(drafts))
        events = [
            StatusEvent(
                revision=first + i,
                media_id=d.media_id,
                owner_id=d.owner_id,
                status=d.status,
                previous_status=d.previous_status,
                attempt=d.attempt,
                event_time=now,
                result=d.result,
                error=d.error,
                next_attempt_at=d.next_attempt_at,
            )
            for i, d in enumerate(drafts)
        ]
        event_log.insert_events(
            conn, [(e, d.result_key) for e, d in zip(events, drafts, strict=True)]
        )
        after_commit(conn, lambda: self._hub.publish(events))
        return events

    # -- submission ----------------------------------------------------------------------

    async def submit(self, specs: Sequence[JobSpec]) -> tuple[list[str], list[str]]:
        """Enqueue new jobs; ids already known are left as they are. Returns (new, known)."""
        unique = list({spec.media_id: spec for spec in specs}.values())

        def transaction(conn: Connection) -> tuple[list[str], list[str]]:
            now = time.time()
            known = job_store.known_ids(conn, [s.media_id for s in unique])
            new = [s for s in unique if s.media_id not in known]
            if new:
                events = self._record(
                    conn,
                    [_Draft(s.media_id, s.owner_id, JobStatus.PENDING, None, 0) for s in new],
                    now,
                )
                job_store.insert_jobs(
                    conn,
                    new,
                    now=now,
                    max_attempts=self._retry.max_attempts,
                    revisions=[e.revision for e in events],
                )
            return [s.media_id for s in new], sorted(known)

        new_ids, known_ids = await write(self._db, transaction)
        if new_ids:
            self._work_available.set()
        return new_ids, known_ids

    # -- claiming ------------------------------------------------------------------------

    async def claim(self, worker_id: str) -> ClaimedJob | None:
        """Lease the next due job in queue order, or None (also while paused)."""
        if self.paused:
            return None

        def transaction(conn: Connection) -> ClaimedJob | None:
            now = time.time()
            row = job_store.next_claimable(conn, now)
            if row is None:
                return None
            (event,) = self._record(
                conn,
                [
                    _Draft(
                        row.media_id,
                        row.owner_id,
                        JobStatus.PROCESSING,
                        JobStatus.PENDING,
                        row.attempt + 1,
                    )
                ],
                now,
            )
            return job_store.claim(
                conn,
                row,
                worker_id=worker_id,
                lease_until=now + self.lease_seconds,
                now=now,
                revision=event.revision,
            )

        # Claims and completions are the workers' frequent changes: they take turns with
        # the fan-out (StatusHub.paced).
        async with self._hub.paced(self._delivery_pacing):
            claiming = asyncio.ensure_future(write(self._db, transaction))
            try:
                return await asyncio.shield(claiming)
            except asyncio.CancelledError:
                # The transaction runs on in its thread and may commit: a job leased to a
                # worker that is gone would wait out its lease and lose an attempt. Give it
                # back (if that fails too, the lease expiry is what is left).
                with contextlib.suppress(Exception):
                    if (claimed := await claiming) is not None:
                        await self.release(claimed)
                raise

    async def wait_for_work(self, max_wait: float) -> None:
        """Sleep until a job may be due (submit, retry, resume, next backoff) or max_wait."""
        self._work_available.clear()
        timeout = max_wait
        if not self.paused:
            due = await read(self._db, job_store.next_due_time)
            if due is not None:
                timeout = min(max_wait, max(0.0, due - time.time()))
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._work_available.wait(), timeout)

    def wake_workers(self) -> None:
        self._work_available.set()

    async def renew_lease(self, job: ClaimedJob) -> bool:
        """Extend the lease; False when it was lost (expired and reclaimed)."""

        def transaction(conn: Connection) -> bool:
            return job_store.fenced_update(
                conn,
                job.spec.media_id,
                job.lease_token,
                {"lease_expires_at": time.time() + self.lease_seconds},
            )

        return await write(self._db, transaction)

    # -- outcomes ------------------------------------------------------------------------

    async def complete(self, job: ClaimedJob, result: JobResult, result_key: str) -> None:
        """Complete the job with the cached result ``result_key``.

        Raises LeaseLost when a newer claim holds the job (this worker was fenced out).
        """

        def transaction(conn: Connection) -> None:
            now = time.time()
            (event,) = self._record(
                conn,
                [
                    _Draft(
                        job.spec.media_id,
                        job.spec.owner_id,
                        JobStatus.COMPLETED,
                        JobStatus.PROCESSING,
                        job.attempt,
                        result=result,
                        result_key=result_key,
                    )
                ],
                now,
            )
            held = job_store.fenced_update(
                conn,
                job.spec.media_id,
                job.lease_token,
                {
                    "status": JobStatus.COMPLETED.value,
                    "result_key": result_key,
                    "reused": result.reused,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "updated_at": now,
                    "revision": event.revision,
                    **job_store.error_values(None),
                },
            )
            if not held:
                # Raising rolls the event back too: a fenced-out worker changes nothing.
                raise LeaseLost(f"lease on media {job.spec.media_id} was lost")
            job_store.finish_attempt(
                conn,
                job.spec.media_id,
                job.attempt,
                ended_at=now,
                outcome=AttemptOutcome.COMPLETED.value,
                error=None,
            )

        async with self._hub.paced(self._delivery_pacing):
            await write(self._db, transaction)

    async def fail_attempt(self, job: ClaimedJob, error: JobError) -> StatusEvent:
        """A failed attempt: retried with backoff if transient and attempts remain, else FAILED."""
        retry = error.transient and job.attempt < self._retry.max_attempts
        return await self._end_attempt(
            job,
            status=JobStatus.PENDING if retry else JobStatus.FAILED,
            error=error,
            outcome=AttemptOutcome.RETRY_SCHEDULED if retry else AttemptOutcome.FAILED,
            delay=self.backoff(job.attempt) if retry else None,
            attempt=job.attempt,
        )

    async def defer(
        self, job: ClaimedJob, outcome: AttemptOutcome, error: JobError, delay: float
    ) -> StatusEvent:
        """Not the job's fault (quota, ingest unreachable): PENDING again after ``delay``.

        ``outcome`` says which deferral it is. The attempt does not count; past
        ``max_quota_deferrals`` such refusals the job FAILS.
        """
        if job.quota_deferrals >= self._retry.max_quota_deferrals:
            return await self._end_attempt(
                job,
                status=JobStatus.FAILED,
                error=error,
                outcome=AttemptOutcome.FAILED,
                delay=None,
                attempt=job.attempt,
            )
        return await self._end_attempt(
            job,
            status=JobStatus.PENDING,
            error=error,
            outcome=outcome,
            delay=delay,
            attempt=job.attempt - 1,
            extra={"quota_deferrals": job.quota_deferrals + 1},
        )

    async def release(self, job: ClaimedJob) -> StatusEvent:
        """Give a job back on shutdown: PENDING at once; the attempt does not count."""
        error = JobError("RELEASED", "the worker stopped before finishing (shutdown)", True)
        return await self._end_attempt(
            job,
            status=JobStatus.PENDING,
            error=None,
            outcome=AttemptOutcome.RELEASED,
            delay=0.0,
            attempt=job.attempt - 1,
            attempt_error=error,
        )

    async def _end_attempt(
        self,
        job: ClaimedJob,
        *,
        status: JobStatus,
        error: JobError | None,
        outcome: AttemptOutcome,
        delay: float | None,
        attempt: int,
        extra: dict[str, Any] | None = None,
        attempt_error: JobError | None = None,
    ) -> StatusEvent:
        """End the attempt with ``status``; a PENDING job is due again after ``delay``."""

        def transaction(conn: Connection) -> StatusEvent:
            now = time.time()
            next_attempt_at = None if delay is None else now + delay
            (event,) = self._record(
                conn,
                [
                    _Draft(
                        job.spec.media_id,
                        job.spec.owner_id,
                        status,
                        JobStatus.PROCESSING,
                        attempt,
                        error=error,
                        next_attempt_at=next_attempt_at,
                    )
                ],
                now,
            )
            values: dict[str, Any] = {
                "status": status.value,
                "attempt": attempt,
                "lease_owner": None,
                "lease_expires_at": None,
                "updated_at": now,
                "revision": event.revision,
                **job_store.error_values(error),
                **(extra or {}),
            }
            if next_attempt_at is not None:
                values["next_attempt_at"] = next_attempt_at
            if not job_store.fenced_update(conn, job.spec.media_id, job.lease_token, values):
                raise LeaseLost(f"lease on media {job.spec.media_id} was lost")
            job_store.finish_attempt(
                conn,
                job.spec.media_id,
                job.attempt,
                ended_at=now,
                outcome=outcome.value,
                error=attempt_error or error,
            )
            return event

        event = await write(self._db, transaction)
        if status is JobStatus.PENDING:
            self._work_available.set()
        return event

    def backoff(self, attempt: int) -> float:
        """Delay before the attempt after ``attempt``: base * 2^(attempt-1), with jitter."""
        policy = self._retry
        delay: float = min(policy.backoff_max, policy.backoff_base * 2.0 ** (attempt - 1))
        return delay * random.uniform(1 - policy.jitter, 1 + policy.jitter)

    # -- recovery ------------------------------------------------------------------------

    async def reap_expired_leases(self) -> list[StatusEvent]:
        """Return jobs whose lease expired to PENDING (or FAILED when out of attempts)."""

        def transaction(conn: Connection) -> list[StatusEvent]:
            now = time.time()
            rows = job_store.expired_leases(conn, now)
            drafts = []
            for row in rows:
                retry = row.attempt < row.max_attempts
                drafts.append(
                    _Draft(
                        row.media_id,
                        row.owner_id,
                        JobStatus.PENDING if retry else JobStatus.FAILED,
                        JobStatus.PROCESSING,
                        row.attempt,
                        error=LEASE_EXPIRED,
                        next_attempt_at=now + self.backoff(row.attempt) if retry else None,
                    )
                )
            events = self._record(conn, drafts, now)
            for row, draft, event in zip(rows, drafts, events, strict=True):
                values: dict[str, Any] = {
                    "status": draft.status.value,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "updated_at": now,
                    "revision": event.revision,
                    **job_store.error_values(LEASE_EXPIRED),
                }
                if draft.next_attempt_at is not None:
                    values["next_attempt_at"] = draft.next_attempt_at
                job_store.fenced_update(conn, row.media_id, row.lease_token, values)
                job_store.finish_attempt(
                    conn,
                    row.media_id,
                    row.attempt,
                    ended_at=now,
                    outcome=AttemptOutcome.LEASE_EXPIRED.value,
                    error=LEASE_EXPIRED,
                )
            return events

        events = await write(self._db, transaction)
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

        def transaction(conn: Connection) -> list[str]:
            now = time.time()
            if media_ids:
                known = job_store.known_ids(conn, media_ids)
                missing = sorted(set(media_ids) - known)
                if missing:
                    raise JobNotFound(
                        f"no job for media {listed(missing)}",
                        field_violations=[
                            FieldViolation("media_ids", f"unknown: {listed(missing)}")
                        ],
                        metadata={"unknownCount": str(len(missing))},
                    )
                rows = [
                    row
                    for terminal in (JobStatus.FAILED, JobStatus.COMPLETED)
                    for row in job_store.job_rows(conn, media_ids, status=terminal)
                ]
            else:
                rows = job_store.job_rows(conn, owner_id=owner_id, status=status)
            drafts = [
                _Draft(row.media_id, row.owner_id, JobStatus.PENDING, JobStatus(row.status), 0)
                for row in rows
            ]
            events = self._record(conn, drafts, now)
            for row, event in zip(rows, events, strict=True):
                job_store.reset_for_retry(conn, row.media_id, now=now, revision=event.revision)
            return [row.media_id for row in rows]

        retried = await write(self._db, transaction)
        if retried:
            self._work_available.set()
        return retried

    async def set_paused(self, paused: bool) -> None:
        await write(
            self._db, lambda conn: event_log.write_counter(conn, schema.PAUSED, int(paused))
        )
        self.paused = paused
        if not paused:
            self._work_available.set()

    # -- reads ---------------------------------------------------------------------------

    async def get(self, media_id: str, *, with_embedding: bool) -> Job | None:
        return await read(
            self._db,
            lambda conn: job_store.get_job(conn, media_id, with_embedding=with_embedding),
        )

    async def owners_of(self, media_ids: Sequence[str]) -> dict[str, str]:
        """The owner of each known job of ``media_ids``; unknown ids are left out."""
        return await read(self._db, lambda conn: job_store.owners_of(conn, media_ids))

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
        return await read(
            self._db,
            lambda conn: job_store.list_jobs(
                conn,
                status=status,
                owner_id=owner_id,
                error_reason=error_reason,
                after=after,
                limit=limit,
                with_embedding=with_embedding,
            ),
        )

    async def depth(self) -> tuple[dict[JobStatus, int], float | None]:
        """Counts by status and the submission time of the oldest PENDING job."""

        def query(conn: Connection) -> tuple[dict[JobStatus, int], float | None]:
            return job_store.counts_by_status(conn), job_store.oldest_pending_submission(conn)

        return await read(self._db, query)

    async def compact_events(self, *, max_age: float, max_events: int) -> int:
        before_time = time.time() - max_age
        return await write(
            self._db,
            lambda conn: event_log.compact(conn, before_time=before_time, keep_last=max_events),
        )
