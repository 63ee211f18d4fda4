"""Recent throughput and job durations, for the queue status and its estimated wait."""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from analysis_service.domain.models import JobStatus, QueueStatus

if TYPE_CHECKING:
    from analysis_service.analyzers.base import Analyzer
    from analysis_service.domain.limits import RateLimits
    from analysis_service.domain.queue import JobQueue
    from analysis_service.domain.workers import WorkerPool

WINDOW = 60.0


class Throughput:
    """Jobs that reached a terminal status in the last minute, and how long they took."""

    def __init__(self) -> None:
        self._finished: collections.deque[tuple[float, float]] = collections.deque()

    def record(self, duration: float) -> None:
        now = time.monotonic()
        self._finished.append((now, duration))
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._finished and self._finished[0][0] < now - WINDOW:
            self._finished.popleft()

    def last_minute(self) -> int:
        self._expire(time.monotonic())
        return len(self._finished)

    def mean_duration(self) -> float | None:
        self._expire(time.monotonic())
        if not self._finished:
            return None
        return sum(d for _, d in self._finished) / len(self._finished)


def estimate_wait(
    *, waiting: int, workers: int, rate_limit: float, mean_duration: float | None
) -> float:
    """Seconds until a job submitted now completes.

    Jobs drain at the lower of the rate limit and what the workers manage
    (workers / mean job duration, once durations are known); the new job waits for the
    ``waiting`` jobs ahead of it, then takes one job duration itself.
    """
    capacity = rate_limit
    if mean_duration and mean_duration > 0:
        capacity = min(capacity, workers / mean_duration)
    own = mean_duration if mean_duration is not None else 1.0 / rate_limit
    return waiting / capacity + own


async def queue_status(
    *,
    queue: JobQueue,
    pool: WorkerPool,
    limits: RateLimits,
    throughput: Throughput,
    analyzer: Analyzer,
    current_revision: int,
) -> QueueStatus:
    """The queue at a glance: depth, workers, limits, throughput, oldest job, estimated wait."""
    counts, oldest_submission = await queue.depth()
    mean = throughput.mean_duration()
    waiting = counts[JobStatus.PENDING] + counts[JobStatus.PROCESSING]
    return QueueStatus(
        counts=counts,
        workers_busy=pool.busy,
        workers_total=pool.size,
        paused=queue.paused,
        rate_limits=limits.snapshot(),
        completed_last_minute=throughput.last_minute(),
        oldest_pending_age=time.time() - oldest_submission if oldest_submission else None,
        estimated_wait=estimate_wait(
            waiting=waiting, workers=pool.size, rate_limit=limits.min_rate(), mean_duration=mean
        ),
        current_revision=current_revision,
        analyzer_name=analyzer.name,
        analyzer_version=analyzer.version,
    )
