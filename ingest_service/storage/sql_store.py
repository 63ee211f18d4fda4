"""The ingest store on SQL: SQLite (one process, or several on one file) and PostgreSQL
(several ingest replicas on one database).

Each method is one transaction, run whole on a database thread
(:class:`mediatag_common.database.Database`); the queries, and where the two databases
differ, are in :mod:`ingest_service.storage.repository`. Driver errors become the service's
own: an outage ``StorageUnavailable``; a conflict with a concurrent transaction (a deadlock,
a serialisation failure, a uniqueness race the statements did not absorb) is retried a few
times, then ``StorageConflict``; anything else ``IngestError``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

from sqlalchemy.engine import Connection

from ingest_service.domain.models import Media, ProcessingStatus, RequestRecord
from ingest_service.domain.store import (
    AnalysisState,
    MirroredChange,
    NewUpload,
    OutboxClaim,
    RemoveBlobs,
)
from ingest_service.errors import IngestError, StorageConflict, StorageUnavailable
from ingest_service.storage import outbox, repository, webhook_deliveries
from mediatag_common.database import Database, DatabaseConflict, DatabaseError, DatabaseUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Tries of a write that conflicts with concurrent transactions before the caller is told.
CONFLICT_ATTEMPTS = 4
# The first pause before trying again, doubled each time (with jitter).
CONFLICT_PAUSE = 0.01


def _service_error(exc: DatabaseError) -> IngestError:
    # The driver's text (SQL, paths) goes to the log with the cause, not to clients.
    if isinstance(exc, DatabaseUnavailable):
        return StorageUnavailable("the ingest database is unavailable")
    if isinstance(exc, DatabaseConflict):
        return StorageConflict("concurrent changes to the ingest database got in the way; retry")
    return IngestError("the ingest database failed")


class SqlTransactions:
    """Transactions on a :class:`Database` with the service's errors: the base of the SQL
    stores."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def _read(self, query: Callable[[Connection], T]) -> T:
        try:
            return await self._db.read(query)
        except DatabaseError as exc:
            raise _service_error(exc) from exc

    async def _write(self, transaction: Callable[[Connection], T]) -> T:
        """``transaction`` committed; tried again while it conflicts (it rolled back then, so
        it runs again from the start)."""
        pause = CONFLICT_PAUSE
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return await self._db.write(transaction)
            except DatabaseConflict as exc:
                if attempt == CONFLICT_ATTEMPTS:
                    raise _service_error(exc) from exc
                logger.info("ingest transaction conflicted (%s); trying again", exc)
            except DatabaseError as exc:
                raise _service_error(exc) from exc
            await asyncio.sleep(random.uniform(0, pause))
            pause *= 2
        raise AssertionError("unreachable")


class SqlIngestStore(SqlTransactions):
    """:class:`ingest_service.domain.store.IngestStore` on a :class:`Database`."""

    # -- uploads and request ids ---------------------------------------------------------

    async def commit_uploads(
        self, uploads: Sequence[NewUpload], *, requests_expire_before: float
    ) -> list[RequestRecord | None]:
        def transaction(conn: Connection) -> list[RequestRecord | None]:
            # The first upload of the group with an id claims it; later ones are its repeats.
            firsts: dict[str, NewUpload] = {}
            for upload in uploads:
                if upload.request is not None:
                    firsts.setdefault(upload.request.request_id, upload)
            recorded = repository.insert_requests(
                conn,
                [upload.request for upload in firsts.values() if upload.request is not None],
                expire_before=requests_expire_before,
            )
            taken = repository.find_requests(
                conn, firsts.keys() - recorded, not_before=requests_expire_before
            )
            if len(taken) + len(recorded) != len(firsts):
                # A record we conflicted with is gone again (purged as it expired): the
                # transaction runs again and records it afresh.
                raise DatabaseConflict("a request record changed meanwhile")
            answers: list[RequestRecord | None] = []
            stored: list[Media] = []
            for upload in uploads:
                prior = None
                if upload.request is not None:
                    request_id = upload.request.request_id
                    first = firsts[request_id]
                    if request_id in taken:
                        prior = taken[request_id]
                    elif first is not upload:
                        prior = first.request
                answers.append(prior)
                if prior is None:
                    stored.extend(upload.items)
            repository.insert_media(conn, stored)
            jobs = [item.id for item in stored if item.status is ProcessingStatus.PENDING]
            outbox.insert_outbox(conn, jobs, now=time.time())
            return answers

        return await self._write(transaction)

    async def find_request(self, request_id: str, *, not_before: float) -> RequestRecord | None:
        found = await self._read(
            lambda conn: repository.find_requests(conn, [request_id], not_before=not_before)
        )
        return found.get(request_id)

    async def purge_requests(self, *, before: float) -> int:
        return await self._write(
            lambda conn: repository.delete_expired_requests(conn, before=before)
        )

    # -- reads -----------------------------------------------------------------------------

    async def get_media(self, media_id: str, *, with_embedding: bool) -> Media | None:
        return await self._read(
            lambda conn: repository.get_media(conn, media_id, with_embedding=with_embedding)
        )

    async def media_in_order(self, media_ids: Sequence[str]) -> list[Media]:
        return await self._read(lambda conn: repository.get_media_many(conn, media_ids))

    async def media_owners(self, media_ids: Sequence[str]) -> dict[str, str]:
        return await self._read(lambda conn: repository.media_owners(conn, media_ids))

    async def list_media(
        self,
        *,
        owner_id: str | None,
        status: ProcessingStatus | None,
        after: tuple[float, str] | None,
        limit: int,
        with_embedding: bool,
    ) -> list[Media]:
        return await self._read(
            lambda conn: repository.list_media(
                conn,
                owner_id=owner_id,
                status=status,
                after=after,
                limit=limit,
                with_embedding=with_embedding,
            )
        )

    async def analysis_states(self, media_ids: Collection[str]) -> dict[str, AnalysisState]:
        return await self._read(lambda conn: repository.analysis_states(conn, media_ids))

    # -- the outbox --------------------------------------------------------------------------

    async def claim_jobs(self, limit: int, *, lease: float) -> OutboxClaim:
        token = str(uuid.uuid4())
        jobs = await self._write(
            lambda conn: outbox.claim_outbox(conn, limit=limit, lease=lease, token=token)
        )
        return OutboxClaim(token, tuple(jobs))

    async def complete_jobs(self, outbox_ids: Collection[int]) -> None:
        await self._write(lambda conn: outbox.delete_outbox(conn, outbox_ids))

    async def release_jobs(self, claim: OutboxClaim) -> None:
        outbox_ids = [job.outbox_id for job in claim.jobs]
        await self._write(lambda conn: outbox.release_outbox(conn, outbox_ids, token=claim.token))

    async def outbox_size(self) -> int:
        return await self._read(outbox.outbox_size)

    # -- the status mirror -------------------------------------------------------------------

    async def mirror_revision(self) -> int:
        return await self._read(repository.mirror_revision)

    async def forget_revisions(self) -> None:
        await self._write(repository.forget_revisions)

    async def resubmit_unknown(self) -> int:
        def transaction(conn: Connection) -> int:
            unknown = repository.unknown_to_analysis(conn)
            outbox.insert_outbox(conn, unknown, now=time.time())
            return len(unknown)

        return await self._write(transaction)

    async def apply_status_changes(
        self,
        changes: Sequence[MirroredChange],
        *,
        revision: int | None,
        quiet_when_unchanged: bool = False,
    ) -> list[bool]:
        def transaction(conn: Connection) -> list[bool]:
            # Rows are locked in one order (by id) whatever order the changes come in: two
            # replicas' mirrors applying overlapping stretches of the stream cannot deadlock.
            repository.lock_media(conn, {change.update.media_id for change in changes})
            applied = []
            for change in changes:
                update = change.update
                changed = repository.apply_status(
                    conn, update, quiet_when_unchanged=quiet_when_unchanged
                )
                if changed and change.webhooks:
                    webhook_deliveries.enqueue(
                        conn,
                        media_id=update.media_id,
                        status=update.status,
                        revision=update.revision,
                        event_time=update.event_time,
                        endpoints=change.webhooks,
                    )
                applied.append(changed)
            if revision is not None:
                # Last: the media rows are locked before the counter row, in every transaction.
                repository.advance_mirror_revision(conn, revision)
            return applied

        return await self._write(transaction)

    # -- the blob sweep ----------------------------------------------------------------------

    async def remove_unreferenced(
        self, sha256s: Collection[str], remove: RemoveBlobs, *, open_for: float
    ) -> set[str]:
        loop = asyncio.get_running_loop()

        def transaction(conn: Connection) -> set[str]:
            repository.lock_out_media_inserts(conn, open_for=open_for)
            orphans = set(sha256s) - repository.referenced_sha256(conn, sha256s)
            if not orphans:
                return set()
            # Removed on the event loop while this transaction holds its lock. The wait
            # is bounded by the caller (``open_for``) and the blob store's call timeouts.
            return _on_loop(loop, lambda: remove(orphans))

        return await self._write(transaction)


def _on_loop(loop: asyncio.AbstractEventLoop, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()`` on ``loop`` from a database thread and wait for its result."""

    async def run() -> T:
        return await work()

    return asyncio.run_coroutine_threadsafe(run(), loop).result()
