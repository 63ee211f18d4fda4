"""The status mirror: keeps each media row's analysis state current from ``WatchStatus``.

It applies the changes the stream holds ready in one transaction, with the revision they
reach, and resumes from that revision: a restart of either service misses nothing and
applies nothing twice. Every ingest replica runs one on the shared database: applying a
change is idempotent by revision (an item never moves back to an older one) and the
persisted revision only ever grows, so the replicas' mirrors may apply the same stream at
their own pace. Never synced (or told that its revision was compacted out of the event
log), it asks for the current state of every item first, and its revision moves only once
that state is whole. Told that its revision is ahead of the log (the analysis database was
restored from a backup, or made anew), it first forgets the revisions of the log that is
gone, since the new one counts them again. Reading the current state of every item, it
enqueues webhooks only for items whose status or attempt it changes; once that state is
whole, items it did not include (the analysis service does not know them: uploaded after
the backup) go back into the outbox. GetMedia and ListMedia read the mirrored rows, so they
answer while the analysis service is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from ingest_service.domain.analysis import (
    AnalysisService,
    ResyncNeeded,
    StatusEvent,
    UnknownStatusChange,
)
from ingest_service.domain.models import StatusUpdate
from ingest_service.domain.store import IngestStore, MirroredChange
from ingest_service.domain.webhooks import WebhookDispatcher
from mediatag_common.backoff import Backoff
from mediatag_common.errors import ServiceError
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# Status changes applied in one transaction at most (those the stream holds ready).
MAX_BATCH = 256


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
        # The analysis service's log was replaced: the revisions applied are to be forgotten.
        self._forget = False

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
                self._forget = self._forget or resync.log_replaced
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
        if self._forget:
            # Before the watch: a mirror stopped after this starts over from revision 0.
            await self._store.forget_revisions()
            self._forget = False
            logger.warning(
                "the analysis service's event log was replaced (its database restored or "
                "made anew): the revisions applied so far are forgotten"
            )
        self._revision = await self._store.mirror_revision()
        # Never synced, or told to start over: the current state of every item comes first.
        self._resync = self._resync or self._revision == 0
        events = self._analysis.watch_status(
            start_revision=0 if self._resync else self._revision, initial_state=self._resync
        )
        # The stream is read ahead while a batch is applied; a bounded buffer holds what
        # came meanwhile (and holds the reader back when full).
        received: asyncio.Queue[StatusEvent | _StreamEnd] = asyncio.Queue(MAX_BATCH)
        # Closed as soon as this stops reading (a failure to apply a change included).
        async with contextlib.aclosing(events):
            reader = asyncio.create_task(_read(events, received), name="status-mirror-reader")
            try:
                while True:
                    batch: list[StatusEvent] = []
                    item = await received.get()
                    while not isinstance(item, _StreamEnd):
                        batch.append(item)
                        if len(batch) == MAX_BATCH or received.empty():
                            break
                        item = received.get_nowait()
                    if batch:
                        if self._backoff.failures:
                            logger.info(
                                "following analysis status again from revision %d", self._revision
                            )
                            self._backoff.reset()
                        await self._apply(batch)
                    if isinstance(item, _StreamEnd):
                        if item.error is not None:
                            raise item.error
                        return
            finally:
                await cancel_and_wait(reader)

    async def _apply(self, events: Sequence[StatusEvent]) -> None:
        """Apply ``events`` (in stream order) in one transaction."""
        changes: list[MirroredChange] = []
        synced = False
        for event in events:
            if isinstance(event, StatusUpdate):
                # Those whose statuses include this one; the store checks their owners.
                endpoints = self._webhooks.endpoints.for_status(event.status)
                changes.append(MirroredChange(event, endpoints))
            elif isinstance(event, UnknownStatusChange):
                logger.error(
                    "ignored status change %d of media %s: unknown status %d",
                    event.revision,
                    event.media_id,
                    event.status,
                )
            elif event.initial_state_end:
                synced = True
        # While the current state of every item is being read, items come in no revision
        # order: the mirror's revision moves only once that state is whole (a restart in the
        # middle of it starts over).
        in_sync = not self._resync or synced
        revision = max(event.revision for event in events) if in_sync else None
        if changes or (revision is not None and revision != self._revision):
            applied = await self._store.apply_status_changes(
                changes, revision=revision, quiet_when_unchanged=self._resync
            )
            woken: set[str] = set()
            for change, changed in zip(changes, applied, strict=True):
                if changed:
                    _log_update(change.update)
                    woken.update(endpoint.name for endpoint in change.webhooks)
            if woken:
                self._webhooks.wake(sorted(woken))
        if synced:
            logger.info("status mirror in sync with analysis at revision %d", events[-1].revision)
            resubmitted = await self._store.resubmit_unknown()
            if resubmitted:
                logger.warning(
                    "%d item(s) unknown to the analysis service put back in the outbox",
                    resubmitted,
                )
            # Last: had that failed, the next watch would read the whole state again.
            self._resync = False
        self._revision = events[-1].revision


@dataclass(frozen=True)
class _StreamEnd:
    """The status stream ended: by itself (``error`` None) or with ``error``."""

    error: Exception | None


async def _read(
    events: AsyncIterator[StatusEvent], received: asyncio.Queue[StatusEvent | _StreamEnd]
) -> None:
    try:
        async for event in events:
            await received.put(event)
    except Exception as exc:
        await received.put(_StreamEnd(exc))
    else:
        await received.put(_StreamEnd(None))


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
