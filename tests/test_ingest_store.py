"""The ingest store on SQLite and PostgreSQL, as several ingest processes on one database use
it: the outbox handed out once, request ids recorded once, the mirror never moving back, the
blob sweep holding off media inserts, and errors that keep their meaning.

Each "process" is a store on a Database of its own (its own connections and threads) on
one database URL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path

import pytest
import sqlalchemy as sa

from ingest_service.domain.models import (
    Media,
    MediaKind,
    ProcessingStatus,
    RequestRecord,
    SniffedMedia,
    StatusUpdate,
)
from ingest_service.domain.store import MirroredChange, NewUpload
from ingest_service.errors import StorageConflict, StorageUnavailable
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from ingest_service.storage.sql_store import SqlIngestStore
from mediatag_common import database as database_module
from mediatag_common.database import Database, sqlite_url
from tests.conftest import DatabaseUrls, wait_until

OWNER = "listing-1"
StoreFactory = Callable[[], Awaitable[SqlIngestStore]]


@pytest.fixture
async def open_store(databases: DatabaseUrls) -> AsyncIterator[StoreFactory]:
    """Stores on one fresh database (SQLite, then PostgreSQL), each with its own Database."""
    url = databases.new("ingest")
    opened: list[Database] = []

    async def open_one() -> SqlIngestStore:
        db = Database(url, synchronous="NORMAL")
        opened.append(db)
        await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
        return SqlIngestStore(db)

    yield open_one
    for db in opened:
        await db.close()


def image(sha256: str = "0" * 64, *, owner_id: str = OWNER) -> Media:
    return Media.stored(
        owner_id=owner_id,
        category="",
        context={},
        filename="a.jpg",
        priority=0,
        found=SniffedMedia("image/jpeg", MediaKind.IMAGE, 8, 8),
        size_bytes=10,
        sha256=sha256,
        now=time.time(),
    )


def upload(*items: Media, request_id: str = "", digest: str = "d") -> NewUpload:
    record = None
    if request_id:
        record = RequestRecord(request_id, digest, tuple(m.id for m in items), "ok", time.time())
    return NewUpload(items, record)


async def commit(store: SqlIngestStore, *uploads: NewUpload) -> list[RequestRecord | None]:
    return await store.commit_uploads(uploads, requests_expire_before=time.time() - 3600)


# -- the outbox ------------------------------------------------------------------------------


async def test_concurrent_claimers_never_get_one_job_twice(open_store: StoreFactory) -> None:
    first, second = await open_store(), await open_store()
    jobs = 120
    await commit(first, *(upload(image()) for _ in range(jobs)))
    delivered: list[int] = []

    async def forward(store: SqlIngestStore) -> None:
        # A forwarder's loop: claim a batch, "deliver" it, complete it, until none is left.
        while claim := (await store.claim_jobs(7, lease=60)).jobs:
            delivered.extend(job.outbox_id for job in claim)
            await store.complete_jobs([job.outbox_id for job in claim])

    await asyncio.gather(*(forward(store) for store in (first, second, first, second)))

    assert len(delivered) == jobs
    assert len(set(delivered)) == jobs
    assert await first.outbox_size() == 0


async def test_a_lease_ends_by_itself_and_only_its_holder_releases_it(
    open_store: StoreFactory,
) -> None:
    crashed, other, third = await open_store(), await open_store(), await open_store()
    item = image()
    await commit(crashed, upload(item))
    lost = await crashed.claim_jobs(10, lease=0.5)
    assert [job.media.id for job in lost.jobs] == [item.id]
    assert (await other.claim_jobs(10, lease=60)).jobs == ()

    taken_over: list[str] = []

    async def lease_ended() -> bool:
        taken_over.extend(job.media.id for job in (await other.claim_jobs(10, lease=60)).jobs)
        return bool(taken_over)

    await wait_until(lease_ended)
    assert taken_over == [item.id]
    # The first claimer, back late, gives back what it no longer holds: nothing changes.
    await crashed.release_jobs(lost)
    assert (await third.claim_jobs(10, lease=60)).jobs == ()
    assert await third.outbox_size() == 1


async def test_a_released_claim_is_handed_out_again_at_once(open_store: StoreFactory) -> None:
    store = await open_store()
    await commit(store, upload(image(), image()))
    claim = await store.claim_jobs(10, lease=60)
    await store.release_jobs(claim)
    again = await store.claim_jobs(10, lease=60)
    assert [job.outbox_id for job in again.jobs] == [job.outbox_id for job in claim.jobs]


# -- request ids -----------------------------------------------------------------------------


async def test_two_processes_committing_one_request_id_store_once(
    open_store: StoreFactory,
) -> None:
    first, second = await open_store(), await open_store()
    request_id = str(uuid.uuid4())
    uploads = [upload(image(), request_id=request_id), upload(image(), request_id=request_id)]

    answers = await asyncio.gather(commit(first, uploads[0]), commit(second, uploads[1]))

    winners = [n for n, [prior] in enumerate(answers) if prior is None]
    assert len(winners) == 1
    [winner] = winners
    [prior] = answers[1 - winner]
    assert prior == uploads[winner].request
    stored = await first.media_in_order([uploads[n].items[0].id for n in (0, 1)])
    assert [m.id for m in stored] == [uploads[winner].items[0].id]
    assert await first.outbox_size() == 1


async def test_an_expired_request_record_is_replaced(open_store: StoreFactory) -> None:
    store = await open_store()
    request_id = str(uuid.uuid4())
    old = upload(image(), request_id=request_id, digest="old")
    await commit(store, old)
    assert old.request is not None
    new = upload(image(), request_id=request_id, digest="new")

    [prior] = await store.commit_uploads([new], requests_expire_before=old.request.created_at + 1)

    assert prior is None
    assert await store.find_request(request_id, not_before=0) == new.request


# -- the status mirror -----------------------------------------------------------------------


def update(media_id: str, revision: int, status: ProcessingStatus) -> StatusUpdate:
    return StatusUpdate(
        revision=revision, media_id=media_id, status=status, attempt=1, event_time=time.time()
    )


async def test_an_older_revision_after_a_newer_one_changes_nothing(
    open_store: StoreFactory,
) -> None:
    first, second = await open_store(), await open_store()
    item = image()
    await commit(first, upload(item))

    assert await first.apply_status_changes(
        [MirroredChange(update(item.id, 7, ProcessingStatus.FAILED))], revision=7
    ) == [True]
    # Another replica's mirror, behind this one, applies what it has only now reached.
    assert await second.apply_status_changes(
        [
            MirroredChange(update(item.id, 5, ProcessingStatus.PROCESSING)),
            MirroredChange(update(item.id, 7, ProcessingStatus.FAILED)),
        ],
        revision=6,
    ) == [False, False]

    stored = await first.get_media(item.id, with_embedding=False)
    assert stored is not None
    assert (stored.status, stored.status_revision) == (ProcessingStatus.FAILED, 7)
    assert await second.mirror_revision() == 7


async def test_changes_applied_together_are_applied_in_stream_order(
    open_store: StoreFactory,
) -> None:
    store = await open_store()
    first, second = image(), image()
    await commit(store, upload(first, second))

    applied = await store.apply_status_changes(
        [
            MirroredChange(update(first.id, 3, ProcessingStatus.PROCESSING)),
            MirroredChange(update(second.id, 4, ProcessingStatus.PROCESSING)),
            MirroredChange(update(first.id, 5, ProcessingStatus.FAILED)),
            MirroredChange(update("never-uploaded", 6, ProcessingStatus.FAILED)),
        ],
        revision=None,
    )

    assert applied == [True, True, True, False]
    shown = [await store.get_media(m.id, with_embedding=False) for m in (first, second)]
    assert [(m.status, m.status_revision) for m in shown if m is not None] == [
        (ProcessingStatus.FAILED, 5),
        (ProcessingStatus.PROCESSING, 4),
    ]
    # None: the mirror's own revision is left as it was.
    assert await store.mirror_revision() == 0


# -- the blob sweep --------------------------------------------------------------------------


async def test_media_rows_wait_for_the_sweep_to_finish_removing(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the sweep holds off inserts of media rows (of any process) while it
    removes blobs no row named when it looked, however much longer than the sessions' idle
    bound its removal takes (if PostgreSQL ended the transaction, the upload would commit
    before the removal, and its blob would go)."""
    sweeper_session = "-c idle_in_transaction_session_timeout=300"
    monkeypatch.setattr(database_module, "_PG_SESSION_OPTIONS", sweeper_session)
    sweeper_db = Database(postgres_url)
    monkeypatch.undo()
    uploader_db = Database(postgres_url)
    await sweeper_db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    sweeper, uploader = SqlIngestStore(sweeper_db), SqlIngestStore(uploader_db)
    orphan, named = "a" * 64, "b" * 64
    await commit(uploader, upload(image(named)))
    removed: list[set[str]] = []
    racing: list[asyncio.Task[list[RequestRecord | None]]] = []

    async def insert_waits() -> bool:
        count = await sweeper_db.read(
            lambda conn: conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ).scalar_one()
        )
        return bool(count)

    async def remove(sha256s: Collection[str]) -> set[str]:
        # An upload of the orphan's content commits meanwhile: it must wait for this.
        racing.append(asyncio.create_task(commit(uploader, upload(image(orphan)))))
        await wait_until(insert_waits)
        # Deletes from a slow store: longer than the sweeper's sessions may stay idle.
        await asyncio.sleep(1.0)
        assert not racing[0].done()
        removed.append(set(sha256s))
        return set(sha256s)

    try:
        removing = sweeper.remove_unreferenced([orphan, named], remove, open_for=2.0)
        assert await removing == {orphan}
        assert removed == [{orphan}]
        assert await racing[0] == [None]
        # Committed after the removal: its uploader finds the blob gone and stores it again.
        listed = await uploader.list_media(
            owner_id=OWNER, status=None, after=None, limit=10, with_embedding=False
        )
        assert {m.sha256 for m in listed} == {orphan, named}
    finally:
        await sweeper_db.close()
        await uploader_db.close()


# -- errors ----------------------------------------------------------------------------------


async def test_a_conflict_is_not_an_outage(
    open_store: StoreFactory, databases: DatabaseUrls, tmp_path: Path
) -> None:
    store = await open_store()
    item = image()
    await commit(store, upload(item))

    with pytest.raises(StorageConflict):
        await commit(store, upload(item))

    if databases.kind == "sqlite":
        unreachable = sqlite_url(str(tmp_path / "no-such-directory" / "ingest.db"))
    else:
        unreachable = databases.new("ingest")
        assert databases.server is not None
        databases.server.drop_database(unreachable)
    gone = Database(unreachable)
    try:
        with pytest.raises(StorageUnavailable):
            await SqlIngestStore(gone).outbox_size()
    finally:
        await gone.close()
