"""Domain objects of the analysis service, free of protobuf and SQL."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


class JobStatus(enum.StrEnum):
    """The status of one job (SPEC §3); values match the proto enum names without prefix."""

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED)


@dataclass(frozen=True)
class JobSpec:
    """What ingest submits for one media item."""

    media_id: str
    owner_id: str
    sha256: str
    size_bytes: int
    content_type: str
    content_ref: str
    category: str = ""
    context: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0


@dataclass(frozen=True)
class JobError:
    """Why an attempt or a job failed."""

    reason: str
    message: str
    transient: bool


@dataclass(frozen=True)
class JobResult:
    """A completed analysis: tags, embedding, who made it, and whether it was reused."""

    tags: tuple[str, ...]
    embedding: npt.NDArray[np.float32] | None
    embedding_dimensions: int
    analyzer_name: str
    analyzer_version: str
    reused: bool


class AttemptOutcome(enum.Enum):
    """How one attempt at a job ended.

    The value is what the attempt history keeps (``Attempt.outcome``, documented in the
    proto); metrics label an outcome by its name in lower case. The last two are a worker's
    view only and are never kept: the job's row belongs to another claim, or to nobody.
    """

    COMPLETED = "COMPLETED"
    RETRY_SCHEDULED = "RETRY_SCHEDULED"
    FAILED = "FAILED"
    # Put off, not counted as an attempt: a quota refusal, or ingest unreachable for the bytes.
    QUOTA_DEFERRED = "QUOTA_EXCEEDED"
    CONTENT_DEFERRED = "CONTENT_UNAVAILABLE"
    # Given back on shutdown; not counted.
    RELEASED = "RELEASED"
    # The reaper's: the worker holding the lease stopped renewing it.
    LEASE_EXPIRED = "LEASE_EXPIRED"
    # The worker found its lease taken over; its outcome was dropped.
    LEASE_LOST = "LEASE_LOST"
    # The worker could not write its outcome (database away); the lease will expire.
    NOT_RECORDED = "NOT_RECORDED"


@dataclass(frozen=True)
class Attempt:
    """One try at a job, kept for the dead-letter view."""

    number: int
    started_at: float
    ended_at: float | None
    # An AttemptOutcome's value, or RUNNING while the attempt is under way.
    outcome: str
    error: JobError | None


@dataclass(frozen=True)
class Job:
    """The queue's view of one media item."""

    spec: JobSpec
    status: JobStatus
    attempt: int
    max_attempts: int
    next_attempt_at: float
    submitted_at: float
    updated_at: float
    revision: int
    lease_token: int = 0
    result: JobResult | None = None
    error: JobError | None = None
    attempts: tuple[Attempt, ...] = ()

    @property
    def media_id(self) -> str:
        return self.spec.media_id


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds under a lease; ``lease_token`` fences its completion."""

    spec: JobSpec
    attempt: int
    lease_token: int
    quota_deferrals: int


@dataclass(frozen=True)
class StatusEvent:
    """One durable status transition, stamped with its revision."""

    revision: int
    media_id: str
    owner_id: str
    status: JobStatus
    previous_status: JobStatus | None
    attempt: int
    event_time: float
    result: JobResult | None = None
    error: JobError | None = None
    next_attempt_at: float | None = None
    initial_state: bool = False


@dataclass(frozen=True)
class Bookmark:
    """A revision a watcher may resume from; ``initial_state_end`` closes the snapshot."""

    revision: int
    initial_state_end: bool = False


@dataclass(frozen=True)
class RateLimitState:
    """One upstream API's limiter, for the queue status."""

    api: str
    rate_per_second: float
    burst: int
    current_use: float
    throttled_until: float | None
    quota_errors: int


@dataclass(frozen=True)
class ReplicaState:
    """One analysis replica, as its heartbeat row says (times on the database's clock)."""

    replica_id: str
    host: str
    pid: int
    workers_total: int
    workers_busy: int
    started_at: float
    last_seen: float
    # False once it has missed several heartbeats: its workers are not counted.
    live: bool
    # Jobs its workers finished in the last minute, and the seconds they took, summed.
    finished_last_minute: int = 0
    busy_seconds_last_minute: float = 0.0


@dataclass(frozen=True)
class QueueStatus:
    """The queue at a glance."""

    counts: Mapping[JobStatus, int]
    workers_busy: int
    workers_total: int
    paused: bool
    rate_limits: tuple[RateLimitState, ...]
    completed_last_minute: int
    oldest_pending_age: float | None
    estimated_wait: float
    current_revision: int
    analyzer_name: str
    analyzer_version: str
    # Every replica on the queue's database, and the one answering.
    replicas: tuple[ReplicaState, ...]
    replica_id: str
