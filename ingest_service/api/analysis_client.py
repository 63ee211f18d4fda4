"""The analysis service over gRPC, as the ingest domain's ``AnalysisService``.

It owns the stub, the protobuf <-> domain conversion, and one table of what each status code
of the analysis service means to ingest.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence

import grpc
import numpy as np
from mediatag.analysis.v1 import analysis_pb2, analysis_pb2_grpc

from ingest_service.domain.analysis import (
    CALL_TIMEOUT,
    ResyncNeeded,
    StatusBookmark,
    StatusEvent,
    UnknownStatusChange,
)
from ingest_service.domain.models import (
    AnalysisFailure,
    AnalysisOutcome,
    Media,
    ProcessingStatus,
    StatusUpdate,
)
from ingest_service.errors import (
    AnalysisRefused,
    AnalysisUnavailable,
    InvalidArgument,
    MediaNotFound,
)
from mediatag_common.errors import (
    RESYNC_REASONS,
    REVISION_AHEAD,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    error_info,
    field_violations,
)

# What a failed call means to ingest's clients; any other code is ``AnalysisRefused``. A
# WatchStatus refusal of its start revision (OUT_OF_RANGE, a reason of RESYNC_REASONS) is
# ``ResyncNeeded`` instead.
_ERRORS: dict[grpc.StatusCode, type[ServiceError]] = {
    # The analysis service is down, restarting or overloaded: later it may answer.
    grpc.StatusCode.UNAVAILABLE: AnalysisUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AnalysisUnavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: AnalysisUnavailable,
    grpc.StatusCode.CANCELLED: AnalysisUnavailable,
    # Its refusals passed on as the same kind of refusal.
    grpc.StatusCode.NOT_FOUND: MediaNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


class AnalysisClient:
    """``SubmitJobs``, ``RetryJobs`` and ``WatchStatus`` of the analysis service on ``channel``
    (which the caller opens and closes)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = analysis_pb2_grpc.AnalysisServiceStub(channel)

    async def submit_jobs(self, media: Sequence[Media]) -> int:
        request = analysis_pb2.SubmitJobsRequest(jobs=[job_spec(item) for item in media])
        try:
            response = await self._stub.SubmitJobs(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise error_of(exc) from CallFailed(exc)
        return response.existing_count

    async def retry_jobs(
        self,
        media_ids: Sequence[str],
        *,
        owner_id: str,
        status: ProcessingStatus | None,
    ) -> tuple[str, ...]:
        request = analysis_pb2.RetryJobsRequest(
            media_ids=media_ids, owner_id=owner_id, status=_analysis_status(status)
        )
        try:
            response = await self._stub.RetryJobs(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise error_of(exc) from CallFailed(exc)
        return tuple(response.media_ids)

    async def watch_status(
        self, *, start_revision: int, initial_state: bool
    ) -> AsyncGenerator[StatusEvent, None]:
        request = analysis_pb2.WatchStatusRequest(
            start_revision=start_revision,
            send_initial_state=initial_state,
            include_embedding=True,
        )
        call = self._stub.WatchStatus(request)
        try:
            async for response in call:
                if response.HasField("change"):
                    yield status_event(response.revision, response.change)
                else:
                    yield StatusBookmark(response.revision, response.bookmark.initial_state_end)
        except grpc.aio.AioRpcError as exc:
            raise error_of(exc) from CallFailed(exc)
        finally:
            call.cancel()


class CallFailed(Exception):
    """A failed call to the analysis service in one line, for the log: its status code and
    details (which may name the service's address, so clients never read them)."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(f"{error.code().name}: {error.details()}")
        self.__cause__ = error


def error_of(error: grpc.aio.AioRpcError) -> Exception:
    """What a failed call of the analysis service means to ingest (see ``_ERRORS``)."""
    code = error.code()
    info = error_info(error)
    if code is grpc.StatusCode.OUT_OF_RANGE and info is not None and info.reason in RESYNC_REASONS:
        return ResyncNeeded(info.reason, log_replaced=info.reason == REVISION_AHEAD)
    kind = _ERRORS.get(code, AnalysisRefused)
    if kind is AnalysisUnavailable:
        return AnalysisUnavailable(f"the analysis service is unavailable ({code.name})")
    # A job the analysis service does not know (yet) is, to the client, media it cannot find.
    reason = None if kind is MediaNotFound else info.reason if info else "ANALYSIS_REFUSED"
    return kind(
        error.details() or code.name, reason=reason, field_violations=field_violations(error)
    )


def job_spec(media: Media) -> analysis_pb2.JobSpec:
    """The claim check for ``media``: its metadata and where to fetch the bytes."""
    return analysis_pb2.JobSpec(
        media_id=media.id,
        owner_id=media.owner_id,
        category=media.category,
        context=dict(media.context),
        sha256=media.sha256,
        size_bytes=media.size_bytes,
        content_type=media.content_type,
        content_ref=media.id,
        priority=media.priority,
    )


def status_event(revision: int, change: analysis_pb2.StatusChange) -> StatusEvent:
    """The domain form of one analysis status change (the enums share names and numbers)."""
    name = analysis_pb2.ProcessingStatus.Name(change.status) if change.status else ""
    try:
        status = ProcessingStatus(name.removeprefix("PROCESSING_STATUS_"))
    except ValueError:
        return UnknownStatusChange(revision, change.media_id, change.status)
    outcome = None
    if status is ProcessingStatus.COMPLETED and change.HasField("result"):
        result = change.result
        outcome = AnalysisOutcome(
            tags=tuple(result.tags),
            embedding=np.array(result.embedding, dtype=np.float32) if result.embedding else None,
            embedding_dimensions=result.embedding_dimensions,
            analyzer_name=result.analyzer_name,
            analyzer_version=result.analyzer_version,
            reused=result.reused,
        )
    error = None
    if status is ProcessingStatus.FAILED and change.HasField("error"):
        error = AnalysisFailure(change.error.reason, change.error.message, change.attempt)
    event_time = (
        change.event_time.ToNanoseconds() / 1e9 if change.HasField("event_time") else time.time()
    )
    return StatusUpdate(
        revision=revision,
        media_id=change.media_id,
        status=status,
        attempt=change.attempt,
        event_time=event_time,
        outcome=outcome,
        error=error,
    )


def _analysis_status(status: ProcessingStatus | None) -> analysis_pb2.ProcessingStatus:
    """The analysis enum shares ingest's names and numbers."""
    if status is None:
        return analysis_pb2.PROCESSING_STATUS_UNSPECIFIED
    value: analysis_pb2.ProcessingStatus = getattr(
        analysis_pb2, f"PROCESSING_STATUS_{status.value}"
    )
    return value
