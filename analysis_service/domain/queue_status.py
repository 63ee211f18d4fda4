"""The queue at a glance (``GetQueueStatus``), with the wait a job submitted now can expect."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from analysis_service.domain.models import JobStatus, QueueStatus

if TYPE_CHECKING:
    from analysis_service.analyzers.base import Analyzer
    from analysis_service.domain.limits import RateLimits
    from analysis_service.domain.queue import JobQueue
    from analysis_service.domain.replicas import Replicas


def estimate_wait(
    *, waiting: int, workers: int, rate_limit: float, mean_duration: float | None
) -> float:
    """Seconds until a job submitted now completes.

    Jobs drain at the lower of the rate limit and what the workers manage
    (workers / mean job duration, once durations are known); the new job waits for the
    ``waiting`` jobs ahead of it, then takes one job duration itself.
    """
    capacity = rate_limit
    # With no live worker anywhere nothing drains until one starts: the estimate is then
    # what the rate limit allows once workers are back.
    if mean_duration and mean_duration > 0 and workers > 0:
        capacity = min(capacity, workers / mean_duration)
    return waiting / capacity + own_duration(mean_duration, rate_limit)


def own_duration(mean_duration: float | None, rate_limit: float) -> float:
    """How long a job takes once it is claimed."""
    return mean_duration if mean_duration is not None else 1.0 / rate_limit


async def queue_status(
    *,
    queue: JobQueue,
    replicas: Replicas,
    limits: RateLimits,
    analyzer: Analyzer,
    current_revision: int,
) -> QueueStatus:
    """The queue at a glance: depth, the workers, throughput and mean job duration of every
    live replica, limits, oldest job, estimated wait."""
    depth = await queue.depth()
    counts, oldest_submission = depth.counts, depth.oldest_pending_submission
    cluster = await replicas.cluster()
    live = [replica for replica in cluster if replica.live]
    workers = sum(replica.workers_total for replica in live)
    finished = sum(replica.finished_last_minute for replica in live)
    busy_seconds = sum(replica.busy_seconds_last_minute for replica in live)
    mean = busy_seconds / finished if finished else None
    waiting = counts[JobStatus.PENDING] + counts[JobStatus.PROCESSING]
    return QueueStatus(
        counts=counts,
        workers_busy=sum(replica.workers_busy for replica in live),
        workers_total=workers,
        paused=await queue.is_paused(),
        rate_limits=await limits.snapshot(),
        completed_last_minute=finished,
        oldest_pending_age=time.time() - oldest_submission if oldest_submission else None,
        estimated_wait=estimate_wait(
            waiting=waiting, workers=workers, rate_limit=limits.min_rate(), mean_duration=mean
        ),
        current_revision=current_revision,
        analyzer_name=analyzer.name,
        analyzer_version=analyzer.version,
        replicas=cluster,
        replica_id=replicas.replica_id,
    )
