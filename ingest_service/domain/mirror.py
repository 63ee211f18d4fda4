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
import contextlib
import logging

from ingest_service.domain.analysis import (
    AnalysisService,
    ResyncNeeded,
    StatusEvent,
    UnknownStatusChange,
)
from ingest_service.domain.models import StatusUpdate
from ingest_service.domain.store import IngestStore
from ingest_service.domain.webhooks import WebhookDispatcher
from mediatag_common.backoff import Backoff
from mediatag_common.errors import ServiceError
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


class StatusMirror:
    """A background task applying the analysis service's status stream to media rows."""

    def __init__(
        self,
        *,
        store: IngestStore,
        analysis: AnalysisService,
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
            except ResyncNeeded as resync:
                logger.warning(
                    "revision %d cannot be resumed (%s): re-syncing the status of every item",
                    self._revision,
                    resync.reason,
                )
                self._resync = True
                continue
            except ServiceError as error:
                problem = str(error)
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
        events = self._analysis.watch_status(
            start_revision=0 if initial else self._revision, initial_state=initial
        )
        # Closed as soon as this stops reading (a failure to apply a change included).
        async with contextlib.aclosing(events):
            async for event in events:
                if self._backoff.failures:
                    logger.info("following analysis status again from revision %d", self._revision)
                    self._backoff.reset()
                await self._apply(event)

    async def _apply(self, event: StatusEvent) -> None:
        if isinstance(event, StatusUpdate):
            # Those whose statuses include this one; the store checks their owners.
            endpoints = self._webhooks.endpoints.for_status(event.status)
            if await self._store.apply_status_change(event, webhooks=endpoints):
                _log_update(event)
                self._webhooks.wake([e.name for e in endpoints])
        elif isinstance(event, UnknownStatusChange):
            await self._store.advance_mirror(event.revision)
            logger.error(
                "ignored status change %d of media %s: unknown status %d",
                event.revision,
                event.media_id,
                event.status,
            )
        else:
            if event.initial_state_end:
                self._resync = False
                logger.info("status mirror in sync with analysis at revision %d", event.revision)
            if event.revision != self._revision:
                await self._store.advance_mirror(event.revision)
        self._revision = event.revision


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
