"""The queue store in memory (see :class:`analysis_service.domain.store.QueueStore`).

It keeps what :class:`~analysis_service.storage.queue_store.SqlQueueStore` keeps, by the same
rules: claims in queue order unless paused, ends fenced by the lease token (a stale one writes
nothing), lease expiry and due times on the store's clock, one event per change with gap-free
revisions in commit order (the log: :mod:`.memory_log`), and the result cache's claims
(:mod:`.memory_results`). No method awaits anything, so each runs whole, as one transaction
does; events go to ``publish`` once it has run. Time comes from an injected
:class:`~analysis_service.domain.clock.Clock`.

It is the queue's fake for fast tests of the domain's rules (tests/test_queue_store.py checks it
against the SQL stores); nothing survives the process.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from analysis_service.domain.clock import SYSTEM_CLOCK, Clock
from analysis_service.domain.models import (
    Attempt,
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
    EventFilter,
    ExpiredLease,
    QueueDepth,
    StatePage,
    check_distinct_keys,
)
from analysis_service.storage.memory_log import MemoryEventLog, matches
from analysis_service.storage.memory_results import MemoryResults

RUNNING = "RUNNING"


@dataclass
class _JobRow:
    spec: JobSpec
    max_attempts: int
    submitted_at: float
    status: JobStatus = JobStatus.PENDING
    attempt: int = 0
    quota_deferrals: int = 0
    next_attempt_at: float = 0.0
    updated_at: float = 0.0
    lease_token: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    result_key: str | None = None
    reused: bool = False
    error: JobError | None = None
    revision: int = 0
    attempts: list[Attempt] = field(default_factory=list)

    def queue_key(self) -> tuple[int, float, str]:
        """Queue order: priority first, then submission time (media id breaks ties)."""
        return (-self.spec.priority, self.submitted_at, self.spec.media_id)

    def claimed(self) -> ClaimedJob:
        return ClaimedJob(self.spec, self.attempt, self.lease_token, self.quota_deferrals)


@dataclass(frozen=True)
class _Change:
    """A status change before it has its revision and time (the SQL store's EventDraft)."""

    row: _JobRow
    status: JobStatus
    previous_status: JobStatus | None
    attempt: int
    result: JobResult | None = None
    result_key: str | None = None
    error: JobError | None = None
    next_attempt_at: float | None = None


class MemoryQueueStore:
    """The queue, its event log and the result cache in this process's memory.

    ``shared`` makes it stand for a database several processes share (the result cache then
    claims keys in it): several queues in one process may use one store as replicas would.
    """

    def __init__(
        self,
        *,
        publish: Callable[[list[StatusEvent]], None],
        clock: Clock = SYSTEM_CLOCK,
        shared: bool = False,
    ) -> None:
        self._publish = publish
        self._clock = clock
        self.shared = shared
        self._jobs: dict[str, _JobRow] = {}
        self._paused = False
        self._results = MemoryResults()
        self._log = MemoryEventLog(self._results)

    def now(self) -> float:
        return self._clock.time()

    def _record(self, changes: Sequence[_Change]) -> list[StatusEvent]:
        """Append the changes' events with the next revisions; hand them on."""
        now = self.now()
        events = []
        for change in changes:
            event = StatusEvent(
                revision=self._log.next_revision(),
                media_id=change.row.spec.media_id,
                owner_id=change.row.spec.owner_id,
                status=change.status,
                previous_status=change.previous_status,
                attempt=change.attempt,
                event_time=now,
                result=change.result,
                error=change.error,
                next_attempt_at=change.next_attempt_at,
            )
            self._log.append(event, change.result_key)
            change.row.revision = event.revision
            events.append(event)
        if events:
            self._publish(events)
        return events

    async def log_bounds(self) -> tuple[int, int]:
        return self._log.revision, self._log.compacted_through

    # -- transitions -------------------------------------------------------------------------

    async def submit(
        self, specs: Sequence[JobSpec], *, max_attempts: int
    ) -> tuple[list[str], list[str]]:
        now = self.now()
        new: list[_JobRow] = []
        for spec in specs:
            if spec.media_id not in self._jobs:
                row = _JobRow(spec, max_attempts, now, next_attempt_at=now, updated_at=now)
                self._jobs[spec.media_id] = row
                new.append(row)
        self._record([_Change(row, JobStatus.PENDING, None, 0) for row in new])
        new_ids = [row.spec.media_id for row in new]
        return new_ids, sorted({spec.media_id for spec in specs} - set(new_ids))

    async def claim(self, holder: str, count: int, lease_seconds: float) -> list[ClaimedJob]:
        if self._paused:
            return []
        now = self.now()
        pending = self._select(status=JobStatus.PENDING)
        due = [row for row in pending if row.next_attempt_at <= now][:count]
        for row in due:
            row.status = JobStatus.PROCESSING
            row.attempt += 1
            row.lease_token += 1
            row.lease_owner = holder
            row.lease_expires_at = now + lease_seconds
            row.updated_at = now
            row.attempts.append(Attempt(row.attempt, now, None, RUNNING, None))
        self._record(
            [_Change(row, JobStatus.PROCESSING, JobStatus.PENDING, row.attempt) for row in due]
        )
        return [row.claimed() for row in due]

    def _held(self, job: ClaimedJob) -> _JobRow | None:
        """The job's row if ``job``'s lease token still holds it (the fence)."""
        row = self._jobs.get(job.spec.media_id)
        if row is None or row.status is not JobStatus.PROCESSING:
            return None
        return row if row.lease_token == job.lease_token else None

    async def renew(self, job: ClaimedJob, lease_seconds: float) -> bool:
        row = self._held(job)
        if row is None:
            return False
        row.lease_expires_at = self.now() + lease_seconds
        return True

    async def end_attempts(self, ends: Sequence[AttemptEnd]) -> list[StatusEvent | None]:
        now = self.now()
        changes = [self._apply_end(end, now) for end in ends]
        events = iter(self._record([change for change in changes if change is not None]))
        return [None if change is None else next(events) for change in changes]

    def _apply_end(self, end: AttemptEnd, now: float) -> _Change | None:
        """Write ``end`` if its token still holds the job (nothing otherwise but its new
        result, kept either way)."""
        if end.new_result is not None and end.result is not None and end.result_key:
            self._results.store(end.result_key, end.result, end.new_result.holder)
        row = self._held(end.job)
        if row is None:
            return None
        row.status = end.status
        row.attempt = end.attempt
        row.lease_owner = row.lease_expires_at = None
        row.updated_at = now
        row.error = end.error
        next_attempt_at = None if end.delay is None else now + end.delay
        if next_attempt_at is not None:
            row.next_attempt_at = next_attempt_at
        if end.quota_deferrals is not None:
            row.quota_deferrals = end.quota_deferrals
        if end.status is JobStatus.COMPLETED:
            row.result_key = end.result_key
            row.reused = bool(end.result and end.result.reused)
        for n, attempt in enumerate(row.attempts):
            if attempt.number == end.job.attempt and attempt.outcome == RUNNING:
                error = end.attempt_error or end.error
                row.attempts[n] = replace(
                    attempt, ended_at=now, outcome=end.outcome.value, error=error
                )
        return _Change(
            row,
            end.status,
            JobStatus.PROCESSING,
            end.attempt,
            result=end.result,
            result_key=end.result_key,
            error=end.error,
            next_attempt_at=next_attempt_at,
        )

    async def expire_leases(
        self, decide: Callable[[ExpiredLease], AttemptEnd]
    ) -> list[StatusEvent]:
        now = self.now()
        expired = [
            row
            for row in self._jobs.values()
            if row.status is JobStatus.PROCESSING
            and row.lease_expires_at is not None
            and row.lease_expires_at < now
        ]
        ends = [decide(ExpiredLease(row.claimed(), row.max_attempts)) for row in expired]
        changes = [self._apply_end(end, now) for end in ends]
        return self._record([change for change in changes if change is not None])

    async def retry(
        self, media_ids: Collection[str], *, owner_id: str, status: JobStatus
    ) -> tuple[list[str], list[str]]:
        if media_ids:
            missing = sorted(set(media_ids) - set(self._jobs))
            if missing:
                return [], missing
            listed = [self._jobs[media_id] for media_id in set(media_ids)]
            rows = [
                row
                for terminal in (JobStatus.FAILED, JobStatus.COMPLETED)
                for row in sorted(listed, key=_JobRow.queue_key)
                if row.status is terminal
            ]
        else:
            rows = self._select(status=status, owner_id=owner_id)
        now = self.now()
        changes = [_Change(row, JobStatus.PENDING, row.status, 0) for row in rows]
        for row in rows:
            row.status = JobStatus.PENDING
            row.attempt = row.quota_deferrals = 0
            row.next_attempt_at = row.updated_at = now
            row.result_key = row.lease_owner = row.lease_expires_at = row.error = None
            row.reused = False
        self._record(changes)
        return [row.spec.media_id for row in rows], []

    async def set_paused(self, paused: bool) -> None:
        self._paused = paused

    async def is_paused(self) -> bool:
        return self._paused

    async def next_due_time(self) -> float | None:
        due = [row.next_attempt_at for row in self._select(status=JobStatus.PENDING)]
        return min(due, default=None)

    # -- reads -------------------------------------------------------------------------------

    def _select(
        self, *, status: JobStatus | None = None, owner_id: str = "", error_reason: str = ""
    ) -> list[_JobRow]:
        """The matching jobs in queue order."""
        rows = [
            row
            for row in self._jobs.values()
            if (status is None or row.status is status)
            and (not owner_id or row.spec.owner_id == owner_id)
            and (not error_reason or (row.error is not None and row.error.reason == error_reason))
        ]
        return sorted(rows, key=_JobRow.queue_key)

    def _job(self, row: _JobRow, with_embedding: bool) -> Job:
        completed = row.status is JobStatus.COMPLETED
        return Job(
            spec=row.spec,
            status=row.status,
            attempt=row.attempt,
            max_attempts=row.max_attempts,
            next_attempt_at=row.next_attempt_at,
            submitted_at=row.submitted_at,
            updated_at=row.updated_at,
            revision=row.revision,
            lease_token=row.lease_token,
            result=self._results.get(
                row.result_key, reused=row.reused, with_embedding=with_embedding
            )
            if completed
            else None,
            error=row.error,
            attempts=tuple(row.attempts),
        )

    async def get_job(self, media_id: str, *, with_embedding: bool) -> Job | None:
        row = self._jobs.get(media_id)
        return None if row is None else self._job(row, with_embedding)

    async def owners_of(self, media_ids: Sequence[str]) -> dict[str, str]:
        return {m: self._jobs[m].spec.owner_id for m in media_ids if m in self._jobs}

    async def list_jobs(
        self,
        *,
        status: JobStatus | None,
        owner_id: str,
        error_reason: str,
        after: Sequence[Any] | None,
        limit: int,
        with_embedding: bool,
    ) -> list[Job]:
        rows = self._select(status=status, owner_id=owner_id, error_reason=error_reason)
        if after is not None:
            priority, submitted_at, media_id = after
            rows = [row for row in rows if row.queue_key() > (-priority, submitted_at, media_id)]
        return [self._job(row, with_embedding) for row in rows[:limit]]

    async def depth(self) -> QueueDepth:
        counts = Counter(row.status for row in self._jobs.values())
        pending = [row.submitted_at for row in self._select(status=JobStatus.PENDING)]
        return QueueDepth(
            {status: counts[status] for status in JobStatus}, min(pending, default=None)
        )

    # -- the event log -----------------------------------------------------------------------

    async def state_page(
        self, events: EventFilter, *, after_media_id: str, limit: int, with_embedding: bool
    ) -> StatePage:
        rows = heapq.nsmallest(
            limit,
            (
                row
                for media_id, row in self._jobs.items()
                if media_id > after_media_id and matches(events, media_id, row.spec.owner_id)
            ),
            key=lambda row: row.spec.media_id,
        )
        return StatePage(
            self._log.revision,
            self._log.compacted_through,
            [self._state(row, with_embedding) for row in rows],
        )

    def _state(self, row: _JobRow, with_embedding: bool) -> StatusEvent:
        """The job's current state as an initial-state event."""
        return StatusEvent(
            revision=row.revision,
            media_id=row.spec.media_id,
            owner_id=row.spec.owner_id,
            status=row.status,
            previous_status=None,
            attempt=row.attempt,
            event_time=row.updated_at,
            result=self._job(row, with_embedding).result,
            error=row.error,
            next_attempt_at=row.next_attempt_at if row.status is JobStatus.PENDING else None,
            initial_state=True,
        )

    async def events_after(
        self, after: int, events: EventFilter, *, limit: int, with_embedding: bool
    ) -> list[StatusEvent]:
        return self._log.after(after, events, limit=limit, with_embedding=with_embedding)

    async def compact(self, *, max_age: float, max_events: int) -> int:
        self._results.drop_expired(self.now())
        return self._log.compact(before_time=self.now() - max_age, keep_last=max_events)

    # -- the result cache --------------------------------------------------------------------

    async def cached_results(self, keys: Sequence[str]) -> Sequence[JobResult | None]:
        return [self._results.get(key, reused=True, with_embedding=True) for key in keys]

    async def store_result(
        self, key: str, sha256: str, result: JobResult, *, holder: str | None
    ) -> None:
        self._results.store(key, result, holder)

    async def take_analyses(
        self, keys: Sequence[str], holder: str, lease_seconds: float
    ) -> Sequence[JobResult | bool]:
        check_distinct_keys(keys)
        now = self.now()
        return [
            self._results.take(key, holder, now=now, lease_seconds=lease_seconds) for key in keys
        ]

    async def drop_analysis(self, key: str, holder: str) -> None:
        self._results.drop(key, holder)
