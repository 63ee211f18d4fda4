"""The status mirror's rules, against a scripted analysis service (the domain's interface) and
a real SQLite store: after an outage it resumes from the last revision it applied; told its
revision cannot be resumed, it starts over from the current state of every item."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path

import pytest

from ingest_service.domain.analysis import ResyncNeeded, StatusBookmark, StatusEvent
from ingest_service.domain.mirror import StatusMirror
from ingest_service.domain.models import (
    AnalysisOutcome,
    Media,
    ProcessingStatus,
    StatusUpdate,
)
from ingest_service.domain.observer import NoObserver
from ingest_service.domain.store import MirroredChange
from ingest_service.domain.webhook_backlog import DeliveryListing
from ingest_service.domain.webhook_endpoints import WebhookEndpoint, WebhookEndpoints
from ingest_service.domain.webhooks import DispatchLimits, RetryPolicy, WebhookDispatcher
from ingest_service.errors import AnalysisUnavailable
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from ingest_service.storage.sql_deliveries import SqlDeliveryStore
from ingest_service.storage.sql_store import SqlIngestStore
from ingest_service.webhook_http import HttpWebhookSender
from mediatag_common.database import Database, sqlite_url
from tests.conftest import wait_until
from tests.test_ingest_store import commit, image, upload

# One watch: what it delivers, in order (an exception ends it); then it stays open, quiet.
Script = Sequence[StatusEvent | Exception]


class ScriptedAnalysis:
    """An ``AnalysisService`` whose watches follow ``scripts``, one per watch, recording how
    each was asked for."""

    def __init__(self, *scripts: Script) -> None:
        self._scripts = list(scripts)
        self.watches: list[tuple[int, bool]] = []

    async def submit_jobs(self, media: Sequence[Media]) -> int:
        return 0

    async def retry_jobs(
        self, media_ids: Sequence[str], *, owner_id: str, status: ProcessingStatus | None
    ) -> tuple[str, ...]:
        return ()

    async def watch_status(
        self, *, start_revision: int, initial_state: bool
    ) -> AsyncGenerator[StatusEvent, None]:
        self.watches.append((start_revision, initial_state))
        for step in self._scripts.pop(0) if self._scripts else ():
            if isinstance(step, Exception):
                raise step
            yield step
        await asyncio.Event().wait()  # until the mirror closes the watch


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(sqlite_url(str(tmp_path / "ingest.db")), synchronous="NORMAL")
    await database.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    yield database
    await database.close()


@pytest.fixture
async def item(db: Database) -> Media:
    """An item stored with the mirror at revision 5."""
    store = SqlIngestStore(db)
    stored = image()
    await commit(store, upload(stored))
    await store.apply_status_changes([], revision=5)
    return stored


def change(revision: int, item: Media, status: ProcessingStatus) -> StatusUpdate:
    outcome = None
    if status is ProcessingStatus.COMPLETED:
        outcome = AnalysisOutcome(("cat",), None, 0, "local", "1", reused=False)
    return StatusUpdate(revision, item.id, status, 1, time.time(), outcome=outcome)


async def mirrored(db: Database, analysis: ScriptedAnalysis, item: Media, revision: int) -> Media:
    """Run a mirror until ``item`` shows ``revision``; the row it shows then."""
    store = SqlIngestStore(db)
    webhooks = WebhookDispatcher(
        store=SqlDeliveryStore(db),
        sender=HttpWebhookSender(timeout=1, max_connections=1),
        endpoints=WebhookEndpoints(None, max_endpoints=1, reload_interval=1),
        policy=RetryPolicy(1, 1, 1),
        limits=DispatchLimits(1, 1, 1),
        observer=NoObserver(),
    )
    mirror = StatusMirror(
        store=store, analysis=analysis, initial_backoff=0.01, max_backoff=0.01, webhooks=webhooks
    )
    mirror.start()
    try:

        async def shows_revision() -> bool:
            found = await store.get_media(item.id, with_embedding=False)
            return found is not None and found.status_revision == revision

        await wait_until(shows_revision)
    finally:
        await mirror.stop()
    found = await store.get_media(item.id, with_embedding=False)
    assert found is not None
    return found


async def test_after_an_outage_the_mirror_resumes_from_the_last_revision_it_applied(
    db: Database, item: Media
) -> None:
    analysis = ScriptedAnalysis(
        [change(6, item, ProcessingStatus.PROCESSING), AnalysisUnavailable("restarting")],
        [change(7, item, ProcessingStatus.COMPLETED)],
    )

    found = await mirrored(db, analysis, item, revision=7)

    assert analysis.watches == [(5, False), (6, False)]
    assert found.status is ProcessingStatus.COMPLETED
    assert await SqlIngestStore(db).mirror_revision() == 7


async def test_a_revision_that_cannot_be_resumed_makes_the_mirror_start_over(
    db: Database, item: Media
) -> None:
    # The log lost revisions 6-11 (compacted, or replaced): the current state comes instead.
    analysis = ScriptedAnalysis(
        [ResyncNeeded("REVISION_COMPACTED")],
        [change(12, item, ProcessingStatus.COMPLETED), StatusBookmark(12, initial_state_end=True)],
    )

    found = await mirrored(db, analysis, item, revision=12)

    assert analysis.watches == [(5, False), (0, True)]
    assert found.status is ProcessingStatus.COMPLETED
    assert found.outcome is not None
    assert found.outcome.tags == ("cat",)
    assert await SqlIngestStore(db).mirror_revision() == 12


async def test_the_mirror_keeps_its_revision_until_the_current_state_is_whole(
    db: Database, item: Media
) -> None:
    # The current state comes item by item, in no revision order: a mirror stopped before its
    # end must not resume after the one item it got, or it would never see the others.
    analysis = ScriptedAnalysis(
        [ResyncNeeded("REVISION_COMPACTED")], [change(12, item, ProcessingStatus.COMPLETED)]
    )

    found = await mirrored(db, analysis, item, revision=12)

    assert found.status is ProcessingStatus.COMPLETED
    assert await SqlIngestStore(db).mirror_revision() == 5


async def test_a_replaced_event_log_makes_the_mirror_forget_its_revisions_and_resubmit(
    db: Database, item: Media
) -> None:
    """The analysis database restored from a backup: its log counts revisions again, below
    the mirror's. The mirror forgets the old revisions, takes the current state (at lower
    revisions), and puts back in the outbox the item the restored service does not know."""
    store = SqlIngestStore(db)
    unknown = image("1" * 64)
    await commit(store, upload(unknown))
    delivered = await store.claim_jobs(10, lease=30)
    await store.complete_jobs([job.outbox_id for job in delivered.jobs])
    # Known to the old log at revisions 900 and 901.
    await store.apply_status_changes(
        [
            MirroredChange(change(900, item, ProcessingStatus.COMPLETED)),
            MirroredChange(change(901, unknown, ProcessingStatus.PROCESSING)),
        ],
        revision=901,
    )
    analysis = ScriptedAnalysis(
        [ResyncNeeded("REVISION_AHEAD", log_replaced=True)],
        # The restored log knows the one item, completed at revision 40.
        [change(40, item, ProcessingStatus.COMPLETED), StatusBookmark(40, initial_state_end=True)],
    )

    found = await mirrored(db, analysis, item, revision=40)

    assert analysis.watches == [(901, False), (0, True)]
    assert found.status is ProcessingStatus.COMPLETED
    assert await store.mirror_revision() == 40
    # The other is analysed again: back in the outbox, its old revision forgotten.
    assert [job.media.id for job in (await store.claim_jobs(10, lease=30)).jobs] == [unknown.id]
    again = await store.get_media(unknown.id, with_embedding=False)
    assert again is not None
    assert again.status_revision == 0


async def test_reading_the_current_state_again_enqueues_webhooks_only_for_what_it_changes(
    db: Database, item: Media
) -> None:
    store = SqlIngestStore(db)
    other = image("2" * 64)
    await commit(store, upload(other))
    await store.apply_status_changes(
        [
            MirroredChange(change(6, item, ProcessingStatus.COMPLETED)),
            MirroredChange(change(7, other, ProcessingStatus.PROCESSING)),
        ],
        revision=7,
    )
    await store.forget_revisions()
    endpoint = WebhookEndpoint(
        "hook", "http://127.0.0.1/hook", "whsec_" + "A" * 32, None, frozenset(ProcessingStatus)
    )
    changes = [
        MirroredChange(change(3, item, ProcessingStatus.COMPLETED), (endpoint,)),
        MirroredChange(change(4, other, ProcessingStatus.COMPLETED), (endpoint,)),
    ]

    applied = await store.apply_status_changes(changes, revision=4, quiet_when_unchanged=True)

    assert applied == [False, True]
    shown = [await store.get_media(m.id, with_embedding=False) for m in (item, other)]
    assert [m.status_revision for m in shown if m is not None] == [3, 4]
    listed = await SqlDeliveryStore(db).listed(DeliveryListing(), limit=10)
    assert [d.change.media_id for d in listed] == [other.id]
