"""What the queue, the watch and the cache need of storage, named by intent.

One implementation per kind of database lives in ``analysis_service.storage``; the domain
sees only this interface and the types beside it. Each method is one transaction. Every
method that changes a job's status also appends its event in that transaction, with the next
revision of the whole log (strictly increasing, gap-free, in commit order), and hands the
events to the store's listener once they are committed (the hub, on every replica).

Times are the store's clock (the database's, where several processes share it), in seconds
since the epoch; the domain passes delays, not instants.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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


@dataclass(frozen=True)
class NewResult:
    """A result the attempt computed (not reused): the end's transaction keeps it in the
    cache under the end's ``result_key``, whether or not the end itself is written, and ends
    ``holder``'s claim on the key (None: no claim was taken)."""

    sha256: str
    holder: str | None


@dataclass(frozen=True)
class AttemptEnd:
    """How a claimed attempt ends: the job's next state, fenced by the claim's lease token.

    ``attempt`` is what the job's attempt count becomes (one less than the claim's when the
    attempt does not count); ``delay`` makes a PENDING job due that many seconds from now.
    """

    job: ClaimedJob
    status: JobStatus
    outcome: AttemptOutcome
    attempt: int
    error: JobError | None = None
    # The error the attempt's history keeps, when it differs from the job's (a release).
    attempt_error: JobError | None = None
    delay: float | None = None
    result: JobResult | None = None
    result_key: str | None = None
    new_result: NewResult | None = None
    quota_deferrals: int | None = None


@dataclass(frozen=True)
class ExpiredLease:
    """A PROCESSING job whose lease ran out (its worker crashed or stalled)."""

    job: ClaimedJob
    max_attempts: int


@dataclass(frozen=True)
class EventFilter:
    """Which events a reader wants: listed media ids and/or one owner (empty = all)."""

    media_ids: Collection[str] = ()
    owner_id: str = ""


@dataclass(frozen=True)
class StatePage:
    """The event log's bounds at one instant, and a page of the current states of the
    filter's jobs at that instant."""

    revision: int
    compacted_through: int
    states: list[StatusEvent]


@dataclass(frozen=True)
class QueueDepth:
    """Jobs by status, and the submission time of the oldest PENDING one."""

    counts: dict[JobStatus, int]
    oldest_pending_submission: float | None


class LogCompacted(Exception):
    """The events after ``after`` are gone (compacted) from the log."""

    def __init__(self, after: int, compacted_through: int, revision: int) -> None:
        super().__init__(f"events after {after} are compacted through {compacted_through}")
        self.after = after
        self.compacted_through = compacted_through
        self.revision = revision


class QueueStore(Protocol):
    """The durable state of the queue, the event log and the result cache."""

    # Several processes may use the store at once (what one process knows in memory, such as
    # which keys it is analysing, the others do not).
    shared: bool

    async def log_bounds(self) -> tuple[int, int]:
        """(newest revision, compacted-through watermark)."""
        ...

    # -- the queue's transitions -----------------------------------------------------------

    async def submit(
        self, specs: Sequence[JobSpec], *, max_attempts: int
    ) -> tuple[list[str], list[str]]:
        """Insert the jobs not yet known (PENDING, due now): (new ids, known ids)."""
        ...

    async def claim(self, holder: str, count: int, lease_seconds: float) -> list[ClaimedJob]:
        """Lease up to ``count`` due PENDING jobs to ``holder``, in queue order, unless the
        queue is paused; each claim's attempt and lease token one above the job's last; no
        job to two claimers, also when several processes claim at once."""
        ...

    async def renew(self, job: ClaimedJob, lease_seconds: float) -> bool:
        """Extend the lease; False when ``job``'s token no longer holds it. A lease past its
        expiry that no reaper has ended yet still holds: it is lost to the reaper or to a
        newer claim, not to the clock alone."""
        ...

    async def end_attempts(self, ends: Sequence[AttemptEnd]) -> list[StatusEvent | None]:
        """Apply each end whose lease token still holds its job; None for the others
        (fenced out: a newer claim holds the job, and nothing of that end is written but its
        ``new_result``: every end's new result is kept in the cache, in the same transaction)."""
        ...

    async def expire_leases(
        self, decide: Callable[[ExpiredLease], AttemptEnd]
    ) -> list[StatusEvent]:
        """End every attempt whose lease expired as ``decide`` says; one event per expiry,
        also when several processes expire leases at once."""
        ...

    async def retry(
        self, media_ids: Collection[str], *, owner_id: str, status: JobStatus
    ) -> tuple[list[str], list[str]]:
        """Terminal jobs back to PENDING with fresh attempts: the listed ones (any terminal
        status) or else every one of ``status`` (and ``owner_id``). A listed job that is not
        terminal (pending or processing) is left as it is and not among the retried. Returns
        (retried ids, unknown listed ids); when some listed id is unknown nothing changes."""
        ...

    async def set_paused(self, paused: bool) -> None: ...

    async def is_paused(self) -> bool: ...

    async def next_due_time(self) -> float | None:
        """When the earliest PENDING job becomes claimable."""
        ...

    def now(self) -> float:
        """The store's idea of the current time (for waits computed from its times)."""
        ...

    # -- reads -----------------------------------------------------------------------------

    async def get_job(self, media_id: str, *, with_embedding: bool) -> Job | None: ...

    async def owners_of(self, media_ids: Sequence[str]) -> dict[str, str]: ...

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
        """A page in queue order after the key ``(priority, submitted_at, media_id)``."""
        ...

    async def depth(self) -> QueueDepth: ...

    # -- the event log ---------------------------------------------------------------------

    async def state_page(
        self, events: EventFilter, *, after_media_id: str, limit: int, with_embedding: bool
    ) -> StatePage:
        """The log's bounds and the current states of up to ``limit`` of the filter's jobs
        whose media id sorts after ``after_media_id``, by media id, from one consistent read.
        Each state carries its job's revision (that of its newest event)."""
        ...

    async def events_after(
        self, after: int, events: EventFilter, *, limit: int, with_embedding: bool
    ) -> list[StatusEvent]:
        """Up to ``limit`` matching events after revision ``after``, oldest first; raises
        LogCompacted when some of them are gone."""
        ...

    async def compact(self, *, max_age: float, max_events: int) -> int:
        """Drop events older than ``max_age`` seconds or beyond the newest ``max_events``,
        and the result cache's expired claims; the new watermark."""
        ...

    # -- the result cache ------------------------------------------------------------------

    async def cached_results(self, keys: Sequence[str]) -> Sequence[JobResult | None]:
        """The result stored under each of ``keys`` (None where there is none)."""
        ...

    async def store_result(
        self, key: str, sha256: str, result: JobResult, *, holder: str | None
    ) -> None:
        """Keep ``result`` under ``key`` (a key already stored is left as it is), and end
        ``holder``'s claim on it."""
        ...

    async def take_analyses(
        self, keys: Sequence[str], holder: str, lease_seconds: float
    ) -> Sequence[JobResult | bool]:
        """For each of ``keys`` (distinct, else ValueError): the result stored under it if
        there is one; else whether ``holder`` became the one process analysing it for
        ``lease_seconds`` (False while another holder's claim on it is live). Asked again by
        the holder of a live claim, it renews that claim for ``lease_seconds`` from now: how a
        holder keeps the key while it analyses. One transaction for them all."""
        ...

    async def drop_analysis(self, key: str, holder: str) -> None:
        """Give up ``holder``'s claim on ``key`` (done, or failed)."""
        ...


def check_distinct_keys(keys: Sequence[str]) -> None:
    """What :meth:`QueueStore.take_analyses` asks of its keys: one call claims a key once
    (asked twice, the second claim would meet the first)."""
    if len(set(keys)) != len(keys):
        raise ValueError("the keys of one take_analyses are distinct")
