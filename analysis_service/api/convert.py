"""Protobuf <-> domain conversion for the analysis API."""

from __future__ import annotations

from collections import OrderedDict

from mediatag.analysis.v1 import analysis_pb2 as pb

from analysis_service.domain.models import (
    Attempt,
    Bookmark,
    Job,
    JobError,
    JobResult,
    JobSpec,
    JobStatus,
    QueueStatus,
    StatusEvent,
)
from mediatag_common.proto_time import duration, timestamp

STATUS_TO_PB: dict[JobStatus, pb.ProcessingStatus] = {
    status: getattr(pb, f"PROCESSING_STATUS_{status.value}") for status in JobStatus
}
STATUS_FROM_PB: dict[int, JobStatus] = {value: status for status, value in STATUS_TO_PB.items()}


def status_from_pb(value: int) -> JobStatus | None:
    """The domain status of a filter value; None for UNSPECIFIED (no filter)."""
    return STATUS_FROM_PB.get(value)


def spec_from_pb(message: pb.JobSpec) -> JobSpec:
    return JobSpec(
        media_id=message.media_id,
        owner_id=message.owner_id,
        sha256=message.sha256.lower(),
        size_bytes=message.size_bytes,
        content_type=message.content_type,
        content_ref=message.content_ref or message.media_id,
        category=message.category,
        context=dict(message.context),
        priority=message.priority,
    )


def result_to_pb(
    result: JobResult | None, *, include_embedding: bool = True
) -> pb.AnalysisResult | None:
    if result is None:
        return None
    embedding = result.embedding if include_embedding else None
    return pb.AnalysisResult(
        tags=result.tags,
        embedding=embedding.tolist() if embedding is not None else [],
        embedding_dimensions=result.embedding_dimensions,
        analyzer_name=result.analyzer_name,
        analyzer_version=result.analyzer_version,
        reused=result.reused,
    )


def error_to_pb(error: JobError | None) -> pb.JobError | None:
    if error is None:
        return None
    return pb.JobError(reason=error.reason, message=error.message, transient=error.transient)


def attempt_to_pb(attempt: Attempt) -> pb.Attempt:
    return pb.Attempt(
        number=attempt.number,
        start_time=timestamp(attempt.started_at),
        end_time=timestamp(attempt.ended_at),
        outcome=attempt.outcome,
        error=error_to_pb(attempt.error),
    )


def job_to_pb(job: Job) -> pb.Job:
    spec = job.spec
    return pb.Job(
        media_id=spec.media_id,
        owner_id=spec.owner_id,
        category=spec.category,
        context=dict(spec.context),
        sha256=spec.sha256,
        size_bytes=spec.size_bytes,
        content_type=spec.content_type,
        priority=spec.priority,
        status=STATUS_TO_PB[job.status],
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        next_attempt_time=timestamp(job.next_attempt_at)
        if job.status is JobStatus.PENDING
        else None,
        submit_time=timestamp(job.submitted_at),
        update_time=timestamp(job.updated_at),
        result=result_to_pb(job.result),
        error=error_to_pb(job.error),
        attempts=[attempt_to_pb(a) for a in job.attempts],
        revision=job.revision,
    )


def watch_item_to_pb(
    item: StatusEvent | Bookmark, *, include_embedding: bool
) -> pb.WatchStatusResponse:
    if isinstance(item, Bookmark):
        return pb.WatchStatusResponse(
            revision=item.revision,
            bookmark=pb.Bookmark(initial_state_end=item.initial_state_end),
        )
    return pb.WatchStatusResponse(
        revision=item.revision,
        change=pb.StatusChange(
            media_id=item.media_id,
            owner_id=item.owner_id,
            status=STATUS_TO_PB[item.status],
            previous_status=(
                STATUS_TO_PB[item.previous_status]
                if item.previous_status
                else pb.PROCESSING_STATUS_UNSPECIFIED
            ),
            attempt=item.attempt,
            result=result_to_pb(item.result, include_embedding=include_embedding),
            error=error_to_pb(item.error),
            event_time=timestamp(item.event_time),
            next_attempt_time=timestamp(item.next_attempt_at),
            initial_state=item.initial_state,
        ),
    )


def queue_status_to_pb(status: QueueStatus) -> pb.GetQueueStatusResponse:
    return pb.GetQueueStatusResponse(
        counts=[
            pb.StatusCount(status=STATUS_TO_PB[s], count=count)
            for s, count in status.counts.items()
        ],
        workers_busy=status.workers_busy,
        workers_total=status.workers_total,
        paused=status.paused,
        rate_limits=[
            pb.RateLimit(
                api=limit.api,
                rate_per_second=limit.rate_per_second,
                burst=limit.burst,
                current_use=limit.current_use,
                throttled_until=timestamp(limit.throttled_until),
                quota_errors=limit.quota_errors,
            )
            for limit in status.rate_limits
        ],
        completed_last_minute=status.completed_last_minute,
        oldest_pending_age=duration(status.oldest_pending_age),
        estimated_wait=duration(status.estimated_wait),
        current_revision=status.current_revision,
        analyzer_name=status.analyzer_name,
        analyzer_version=status.analyzer_version,
        replicas=[
            pb.Replica(
                replica_id=replica.replica_id,
                host=replica.host,
                pid=replica.pid,
                workers_total=replica.workers_total,
                workers_busy=replica.workers_busy,
                start_time=timestamp(replica.started_at),
                last_seen_time=timestamp(replica.last_seen),
                state=pb.REPLICA_STATE_LIVE if replica.live else pb.REPLICA_STATE_GONE,
            )
            for replica in status.replicas
        ],
        replica_id=status.replica_id,
    )


class WatchMessages:
    """``watch_item_to_pb``, converted once per event and shared by every stream.

    A revision names one event, so (revision, initial state, embedding or not) names one
    message: with a thousand watchers, each live event is converted once, not a thousand
    times. The newest ``size`` messages are kept.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._messages: OrderedDict[tuple[int, bool, bool], pb.WatchStatusResponse] = OrderedDict()

    def get(
        self, item: StatusEvent | Bookmark, *, include_embedding: bool
    ) -> pb.WatchStatusResponse:
        if isinstance(item, Bookmark):
            return watch_item_to_pb(item, include_embedding=include_embedding)
        key = (item.revision, item.initial_state, include_embedding)
        message = self._messages.get(key)
        if message is None:
            message = self._messages[key] = watch_item_to_pb(
                item, include_embedding=include_embedding
            )
            if len(self._messages) > self._size:
                self._messages.popitem(last=False)
        return message
