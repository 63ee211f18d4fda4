"""The gRPC surface of the analysis service: protobuf <-> domain, nothing else.

Errors are raised as AnalysisError subclasses; the shared ErrorMappingInterceptor gives each its
status code from ``status_codes.STATUS_CODES``. With authentication on, the shared
AuthInterceptor has checked the caller's role against ``METHOD_ROLES`` before a method runs;
the methods check its owners (``auth.owner_scope()``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence, Sized
from typing import Any

import grpc
from mediatag.analysis.v1 import analysis_pb2 as pb
from mediatag.analysis.v1 import analysis_pb2_grpc

from analysis_service.analyzers.base import Analyzer
from analysis_service.api import convert
from analysis_service.domain.limits import RateLimits
from analysis_service.domain.models import Bookmark, JobStatus
from analysis_service.domain.queue import JobQueue
from analysis_service.domain.queue_status import queue_status
from analysis_service.domain.replicas import Replicas
from analysis_service.domain.watch import StatusWatcher, WatchRequest
from analysis_service.errors import JobNotFound, invalid
from analysis_service.metrics import AnalysisMetrics
from mediatag_common import auth, paging
from mediatag_common.auth import SERVICE, UPLOADER, VIEWER
from mediatag_common.errors import FieldViolation
from mediatag_common.untrusted_text import escaped

Context = grpc.aio.ServicerContext[Any, Any]

_SERVICE = pb.DESCRIPTOR.services_by_name["AnalysisService"].full_name
# Who may call what (admin may call everything, pausing and resuming only admin). The ingest
# service (role ``service``) submits jobs, mirrors statuses and passes reprocessing on.
METHOD_ROLES: auth.MethodRoles = {
    f"/{_SERVICE}/{method}": frozenset(roles)
    for method, roles in {
        "SubmitJobs": {SERVICE},
        "GetJob": {UPLOADER, VIEWER},
        "ListJobs": {UPLOADER, VIEWER},
        "WatchStatus": {UPLOADER, VIEWER, SERVICE},
        "GetQueueStatus": {UPLOADER, VIEWER},
        "RetryJobs": {SERVICE},
    }.items()
}

MAX_SUBMIT_BATCH = 1000
# The longest media id there is: the ingest service names items with UUIDs (36 characters).
# A longer one is nobody's, and would only be echoed back (a refusal naming a 100,000-
# character id outgrew the trailers a client accepts).
MAX_MEDIA_ID_LENGTH = 36
# Media ids one RetryJobs may name, as ingest's ReprocessMedia.
MAX_RETRY_IDS = 1000
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _check_media_id(field: str, media_id: str) -> None:
    if not media_id:
        raise invalid(field, "MEDIA_ID_REQUIRED", "required")
    if len(media_id) > MAX_MEDIA_ID_LENGTH:
        raise invalid(field, "MEDIA_ID_TOO_LONG", f"at most {MAX_MEDIA_ID_LENGTH} characters")


def _check_media_ids(media_ids: Sequence[str]) -> None:
    for index, media_id in enumerate(media_ids):
        _check_media_id(f"media_ids[{index}]", media_id)


def _validate_spec(index: int, spec: pb.JobSpec) -> None:
    prefix = f"jobs[{index}]"
    _check_media_id(f"{prefix}.media_id", spec.media_id)
    if not spec.owner_id:
        raise invalid(f"{prefix}.owner_id", "OWNER_ID_REQUIRED", "required")
    if not SHA256_HEX.match(spec.sha256.lower()):
        raise invalid(f"{prefix}.sha256", "INVALID_SHA256", "must be 64 hex digits")
    if spec.size_bytes < 0:
        raise invalid(f"{prefix}.size_bytes", "INVALID_SIZE", "must not be negative")


def _check_id_count(media_ids: Sized, limit: int) -> None:
    if len(media_ids) > limit:
        raise invalid(
            "media_ids", "TOO_MANY_MEDIA_IDS", f"{len(media_ids)} media ids; at most {limit}"
        )


def _page_size(requested: int) -> int:
    try:
        return paging.page_size(requested)
    except paging.InvalidPageSize as exc:
        raise invalid("page_size", "INVALID_PAGE_SIZE", str(exc)) from exc


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    """Implements mediatag.analysis.v1.AnalysisService."""

    def __init__(
        self,
        *,
        queue: JobQueue,
        watcher: StatusWatcher,
        replicas: Replicas,
        limits: RateLimits,
        analyzer: Analyzer,
        metrics: AnalysisMetrics,
        max_watch_media_ids: int,
        page_tokens: paging.PageTokens,
    ) -> None:
        self._page_tokens = page_tokens
        self._queue = queue
        self._max_watch_media_ids = max_watch_media_ids
        self._watcher = watcher
        self._watch_messages = convert.WatchMessages()
        self._replicas = replicas
        self._limits = limits
        self._analyzer = analyzer
        self._sent_events = metrics.watch_messages.labels("event")
        self._sent_bookmarks = metrics.watch_messages.labels("bookmark")

    async def SubmitJobs(
        self, request: pb.SubmitJobsRequest, context: Context
    ) -> pb.SubmitJobsResponse:
        if len(request.jobs) > MAX_SUBMIT_BATCH:
            raise invalid("jobs", "TOO_MANY_JOBS", f"at most {MAX_SUBMIT_BATCH} per call")
        scope = auth.owner_scope()
        for index, spec in enumerate(request.jobs):
            _validate_spec(index, spec)
            scope.check_owner(spec.owner_id, f"jobs[{index}].owner_id")
        new, known = await self._queue.submit([convert.spec_from_pb(s) for s in request.jobs])
        return pb.SubmitJobsResponse(accepted_count=len(new), existing_count=len(known))

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        _check_media_id("media_id", request.media_id)
        await auth.owner_scope().check_visible(request.media_id, self._queue.owners_of, "media_id")
        job = await self._queue.get(
            request.media_id, with_embedding=request.view == pb.JOB_VIEW_FULL
        )
        if job is None:
            raise JobNotFound(
                f"no job for media {escaped(request.media_id)}",
                field_violations=[FieldViolation("media_id", "unknown")],
            )
        return pb.GetJobResponse(job=convert.job_to_pb(job))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        limit = _page_size(request.page_size)
        owner_id = auth.owner_scope().list_owner(request.owner_id)
        filters: dict[str, paging.KeyPart] = {
            "status": request.status,
            "owner_id": owner_id,
            "error_reason": request.error_reason,
        }
        try:
            after = self._page_tokens.resume_after(request.page_token, filters, (int, float, str))
        except paging.InvalidPageToken as exc:
            raise invalid("page_token", "INVALID_PAGE_TOKEN", str(exc)) from exc
        jobs = await self._queue.list(
            status=convert.status_from_pb(request.status),
            owner_id=owner_id,
            error_reason=request.error_reason,
            after=after,
            limit=limit + 1,
            with_embedding=request.view == pb.JOB_VIEW_FULL,
        )
        page, more = jobs[:limit], len(jobs) > limit
        token = ""
        if more:
            last = page[-1]
            token = self._page_tokens.issue(
                [last.spec.priority, last.submitted_at, last.media_id], filters
            )
        return pb.ListJobsResponse(jobs=[convert.job_to_pb(j) for j in page], next_page_token=token)

    async def WatchStatus(
        self, request: pb.WatchStatusRequest, context: Context
    ) -> AsyncIterator[pb.WatchStatusResponse]:
        # Counted on the message, before a set of them is built: the set is what costs.
        _check_id_count(request.media_ids, self._max_watch_media_ids)
        _check_media_ids(request.media_ids)
        # Other owners' items are left out as if unknown (they are not refused: refusing
        # would tell the caller which ids exist); naming another owner is refused.
        scope = auth.owner_scope()
        scope.check_owner(request.owner_id)
        watch = WatchRequest(
            media_ids=frozenset(request.media_ids),
            owner_id=request.owner_id,
            allowed_owners=scope.owners,
            start_revision=request.start_revision,
            send_initial_state=request.send_initial_state,
            until_terminal=request.until_terminal,
            include_embedding=request.include_embedding,
        )
        async with self._watcher.watch(watch, auth.current_caller(context.peer())) as stream:
            # Headers as soon as the stream is registered (a refusal is the call's status
            # instead), so a client knows it is open before the first event, which may be a
            # bookmark interval away.
            await context.send_initial_metadata(())
            # A cancelled call (client gone) propagates CancelledError untouched: swallowing
            # it leaks the call (grpc/grpc#43360).
            async for item in stream:
                yield self._watch_messages.get(item, include_embedding=request.include_embedding)
                (self._sent_bookmarks if isinstance(item, Bookmark) else self._sent_events).inc()

    async def GetQueueStatus(
        self, request: pb.GetQueueStatusRequest, context: Context
    ) -> pb.GetQueueStatusResponse:
        status = await queue_status(
            queue=self._queue,
            replicas=self._replicas,
            limits=self._limits,
            analyzer=self._analyzer,
            current_revision=self._watcher.current_revision,
        )
        return convert.queue_status_to_pb(status)

    async def RetryJobs(
        self, request: pb.RetryJobsRequest, context: Context
    ) -> pb.RetryJobsResponse:
        status = convert.status_from_pb(request.status)
        if status is not None and not status.terminal:
            raise invalid(
                "status", "INVALID_STATUS", "only FAILED or COMPLETED jobs can be retried"
            )
        if not request.media_ids and not request.owner_id and status is None:
            raise invalid(
                "media_ids", "FILTER_REQUIRED", "name media_ids, or an owner_id and/or status"
            )
        _check_id_count(request.media_ids, MAX_RETRY_IDS)
        _check_media_ids(request.media_ids)
        owner_id = await auth.owner_scope().check_selection(
            request.media_ids, request.owner_id, self._queue.owners_of
        )
        retried = await self._queue.retry(
            list(request.media_ids),
            owner_id=owner_id,
            status=status or JobStatus.FAILED,
        )
        return pb.RetryJobsResponse(media_ids=retried, count=len(retried))

    async def PauseQueue(
        self, request: pb.PauseQueueRequest, context: Context
    ) -> pb.PauseQueueResponse:
        await self._queue.set_paused(True)
        return pb.PauseQueueResponse(paused=True)

    async def ResumeQueue(
        self, request: pb.ResumeQueueRequest, context: Context
    ) -> pb.ResumeQueueResponse:
        await self._queue.set_paused(False)
        return pb.ResumeQueueResponse(paused=False)
