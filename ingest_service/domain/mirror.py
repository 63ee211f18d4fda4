"""The status mirror: keeps each media row's analysis state current from ``WatchStatus``.

It resumes from the last applied revision, persisted in the same transaction as each change,
so a restart of either service misses nothing and applies nothing twice. Every ingest
replica runs one on the shared database: applying a change is idempotent by revision (an
item never moves back to an older one) and the persisted revision only ever grows, so the
replicas' mirrors may apply the same stream at their own pace. Never synced (or
told that its revision was compacted out of the event log), it asks for the current state
of every item first. GetMedia and ListMedia read the mirrored rows, so they answer while the
analysis service is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc
import numpy as np
from mediatag.analysis.v1 import analysis_pb2

from ingest_service.domain.models import (
    AnalysisFailure,
    AnalysisOutcome,
    ProcessingStatus,
    StatusUpdate,
)
from ingest_service.domain.store import IngestStore
from ingest_service.domain.webhooks import WebhookDispatcher
from mediatag_common.backoff import Backoff
from mediatag_common.errors import RESYNC_REASONS, error_info
from mediatag_common.tasks import cancel_and_wait

if TYPE_CHECKING:
    from mediatag.analysis.v1.analysis_pb2_grpc import AnalysisServiceAsyncStub

logger = logging.getLogger(__name__)


def status_update(revision: int, change: analysis_pb2.StatusChange) -> StatusUpdate | None:
    """The domain form of one analysis status change (the enums share names and numbers);
    None for a status this version does not know."""
    name = analysis_pb2.ProcessingStatus.Name(change.status) if change.status else ""
    try:
        status = ProcessingStatus(name.removeprefix("PROCESSING_STATUS_"))
    except ValueError:
        return None
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


class StatusMirror:
    """A background task applying the analysis service's status stream to media rows."""

    def __init__(
        self,
        *,
        store: IngestStore,
        analysis: AnalysisServiceAsyncStub,
        initial_backoff: float,
        max_backoff: float,
        webhooks: WebhookDispatcher,
    ) -> None:
        self._store = store
        self._analysis = analysis
        self._webhooks = webhooks
        self._backoff = Backoff(initial_backoff, max_backoff)
        self._task: asyncio.Task[None] | None = None
        self._revision = 0
        self._resync = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="status-mirror")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            failure: Exception | None = None
            try:
                await self._follow()
                problem = "the status stream ended"
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                if (
                    error.code() is grpc.StatusCode.OUT_OF_RANGE
                    and info is not None
                    and info.reason in RESYNC_REASONS
                ):
                    logger.warning(
                        "revision %d cannot be resumed (%s): re-syncing the status of every item",
                        self._revision,
                        info.reason,
                    )
                    self._resync = True
                    continue
                problem = f"{error.code().name}: {error.details()}"
            except Exception as exc:
                problem, failure = f"{type(exc).__name__}: {exc}", exc
            delay = self._backoff.next_delay()
            if self._backoff.failures == 1:
                logger.warning(
                    "analysis status stream unavailable (%s); reconnecting with backoff "
                    "from revision %d",
                    problem,
                    self._revision,
                    exc_info=failure,
                )
            await asyncio.sleep(delay)

    async def _follow(self) -> None:
        self._revision = await self._store.mirror_revision()
        initial = self._resync or self._revision == 0
        request = analysis_pb2.WatchStatusRequest(
            start_revision=0 if initial else self._revision,
            send_initial_state=initial,
            include_embedding=True,
        )
        call = self._analysis.WatchStatus(request)
        try:
            async for response in call:
                if self._backoff.failures:
                    logger.info("following analysis status again from revision %d", self._revision)
                    self._backoff.reset()
                await self._apply(response)
        finally:
            call.cancel()

    async def _apply(self, response: analysis_pb2.WatchStatusResponse) -> None:
        revision = response.revision
        if response.HasField("change"):
            update = status_update(revision, response.change)
            if update is None:
                await self._store.advance_mirror(revision)
                logger.error(
                    "ignored status change %d of media %s: unknown status %d",
                    revision,
                    response.change.media_id,
                    response.change.status,
                )
            else:
                # Those whose statuses include this one; the store checks their owners.
                endpoints = self._webhooks.endpoints.for_status(update.status)
                if await self._store.apply_status_change(update, webhooks=endpoints):
                    _log_update(update)
                    self._webhooks.wake([e.name for e in endpoints])
            self._revision = revision
            return
        if response.bookmark.initial_state_end:
            self._resync = False
            logger.info("status mirror in sync with analysis at revision %d", revision)
        if revision != self._revision:
            await self._store.advance_mirror(revision)
            self._revision = revision


def _log_update(update: StatusUpdate) -> None:
    if update.outcome is not None:
        logger.info(
            "media %s completed%s: %s",
            update.media_id,
            " (reused result)" if update.outcome.reused else "",
            ", ".join(update.outcome.tags) or "no tags",
        )
    elif update.error is not None:
        logger.info(
            "media %s failed on attempt %d: %s %s",
            update.media_id,
            update.attempt,
            update.error.reason,
            update.error.message,
        )
    else:
        logger.debug(
            "media %s is %s (attempt %d)", update.media_id, update.status.value, update.attempt
        )
