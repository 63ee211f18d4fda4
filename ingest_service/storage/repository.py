"""Every query of the ingest service, and database access with errors wrapped."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ingest_service.domain.models import (
    AnalysisFailure,
    AnalysisOutcome,
    Media,
    MediaKind,
    ProcessingStatus,
    RequestRecord,
    StatusUpdate,
)
from ingest_service.errors import StorageUnavailable
from ingest_service.storage.schema import (
    MIRROR_REVISION,
    counters,
    media,
    outbox,
    upload_requests,
)
from mediatag_common.async_database import Database, raising_as
from mediatag_common.database import DatabaseError
from mediatag_common.embeddings import embedding_from_bytes, embedding_to_bytes

# ListMedia order: newest first; the id breaks ties within one upload.
LIST_ORDER = (media.c.created_at.desc(), media.c.id.desc())


def _unavailable(exc: DatabaseError) -> StorageUnavailable:
    # The driver's text (SQL, paths) goes to the log with the cause, not to clients.
    return StorageUnavailable("the ingest database is unavailable")


def reading(db: Database) -> AbstractAsyncContextManager[AsyncConnection]:
    """A connection for reads; raises StorageUnavailable when the database fails."""
    return raising_as(db.read(), _unavailable)


def writing(db: Database) -> AbstractAsyncContextManager[AsyncConnection]:
    """A serialised write transaction that commits on exit."""
    return raising_as(db.write(), _unavailable)


# -- media ---------------------------------------------------------------------------------


def _columns(with_embedding: bool) -> list[Any]:
    return [c for c in media.c if with_embedding or c.name != "embedding"]


def media_from_row(row: Any) -> Media:
    outcome = None
    if row.status == ProcessingStatus.COMPLETED.value:
        raw = getattr(row, "embedding", None)
        outcome = AnalysisOutcome(
            tags=tuple(row.tags or ()),
            embedding=embedding_from_bytes(raw) if raw is not None else None,
            embedding_dimensions=row.embedding_dimensions,
            analyzer_name=row.analyzer_name,
            analyzer_version=row.analyzer_version,
            reused=row.reused,
        )
    error = None
    if row.error_reason is not None:
        error = AnalysisFailure(row.error_reason, row.error_message or "", row.error_attempt or 0)
    return Media(
        id=row.id,
        owner_id=row.owner_id,
        category=row.category,
        context=dict(row.context),
        filename=row.filename,
        content_type=row.content_type,
        kind=MediaKind(row.kind),
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        width=row.width,
        height=row.height,
        priority=row.priority,
        status=ProcessingStatus(row.status),
        not_applicable_reason=row.not_applicable_reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        attempt=row.attempt,
        outcome=outcome,
        error=error,
        status_revision=row.status_revision,
    )


def _outcome_values(outcome: AnalysisOutcome | None) -> dict[str, Any]:
    """Column values recording ``outcome`` (or clearing it)."""
    embedding = None
    if outcome is not None and outcome.embedding is not None:
        embedding = embedding_to_bytes(outcome.embedding)
    return {
        "tags": list(outcome.tags) if outcome else None,
        "embedding": embedding,
        "embedding_dimensions": outcome.embedding_dimensions if outcome else 0,
        "analyzer_name": outcome.analyzer_name if outcome else "",
        "analyzer_version": outcome.analyzer_version if outcome else "",
        "reused": outcome.reused if outcome else False,
    }


def _error_values(error: AnalysisFailure | None) -> dict[str, Any]:
    return {
        "error_reason": error.reason if error else None,
        "error_message": error.message if error else None,
        "error_attempt": error.attempt if error else None,
    }


async def insert_media(conn: AsyncConnection, items: Sequence[Media]) -> None:
    await conn.execute(
        media.insert(),
        [
            {
                "id": item.id,
                "owner_id": item.owner_id,
                "category": item.category,
                "context": dict(item.context),
                "filename": item.filename,
                "content_type": item.content_type,
                "kind": item.kind.value,
                "size_bytes": item.size_bytes,
                "sha256": item.sha256,
                "width": item.width,
                "height": item.height,
                "priority": item.priority,
                "status": item.status.value,
                "not_applicable_reason": item.not_applicable_reason,
                "attempt": item.attempt,
                "status_revision": item.status_revision,
                "created_at": item.created_at,
                "updated_at": item.updated_at,
                **_outcome_values(item.outcome),
                **_error_values(item.error),
            }
            for item in items
        ],
    )


async def get_media(conn: AsyncConnection, media_id: str, *, with_embedding: bool) -> Media | None:
    query = sa.select(*_columns(with_embedding)).where(media.c.id == media_id)
    row = (await conn.execute(query)).first()
    return media_from_row(row) if row is not None else None


async def media_owners(conn: AsyncConnection, media_ids: Sequence[str]) -> dict[str, str]:
    """The owner of each known item of ``media_ids``, in one query."""
    rows = await conn.execute(
        sa.select(media.c.id, media.c.owner_id).where(media.c.id.in_(list(media_ids)))
    )
    return {row.id: row.owner_id for row in rows}


async def get_media_many(conn: AsyncConnection, media_ids: Sequence[str]) -> list[Media]:
    """The items of ``media_ids`` (embeddings left out), in that order; unknown ids are skipped."""
    rows = await conn.execute(
        sa.select(*_columns(with_embedding=False)).where(media.c.id.in_(list(media_ids)))
    )
    found = {row.id: media_from_row(row) for row in rows}
    return [found[media_id] for media_id in media_ids if media_id in found]


async def list_media(
    conn: AsyncConnection,
    *,
    owner_id: str,
    status: ProcessingStatus | None,
    after: tuple[float, str] | None,
    limit: int,
    with_embedding: bool,
) -> list[Media]:
    """One owner's items newest first, starting after the key ``(created_at, id)``."""
    query = sa.select(*_columns(with_embedding)).where(media.c.owner_id == owner_id)
    if status is not None:
        query = query.where(media.c.status == status.value)
    if after is not None:
        created_at, media_id = after
        query = query.where(
            sa.or_(
                media.c.created_at < created_at,
                sa.and_(media.c.created_at == created_at, media.c.id < media_id),
            )
        )
    rows = await conn.execute(query.order_by(*LIST_ORDER).limit(limit))
    return [media_from_row(row) for row in rows]


async def referenced_sha256(conn: AsyncConnection, candidates: Collection[str]) -> set[str]:
    """Which of the blobs ``candidates`` (hex SHA-256) some media row names.

    The blob sweep calls it in a write transaction and deletes the others before that
    commits, so no upload commits a row naming one of them meanwhile (SQLite: the one writer;
    a database with concurrent writers must lock out inserts of media rows until the
    transaction ends, e.g. PostgreSQL's ``LOCK TABLE media IN SHARE MODE``).
    """
    rows = await conn.execute(
        sa.select(media.c.sha256).where(media.c.sha256.in_(list(candidates))).distinct()
    )
    return {row.sha256 for row in rows}


async def media_statuses(
    conn: AsyncConnection, media_ids: Collection[str]
) -> dict[str, ProcessingStatus]:
    rows = await conn.execute(
        sa.select(media.c.id, media.c.status).where(media.c.id.in_(list(media_ids)))
    )
    return {row.id: ProcessingStatus(row.status) for row in rows}


async def apply_status(conn: AsyncConnection, update: StatusUpdate) -> bool:
    """Apply ``update`` unless the row already holds that revision or a later one.

    False when nothing changed (an unknown media id, or a stale revision).
    """
    result = await conn.execute(
        sa.update(media)
        .where(media.c.id == update.media_id, media.c.status_revision < update.revision)
        .values(
            status=update.status.value,
            attempt=update.attempt,
            status_revision=update.revision,
            updated_at=update.event_time,
            **_outcome_values(update.outcome),
            **_error_values(update.error),
        )
    )
    return bool(result.rowcount)


# -- outbox --------------------------------------------------------------------------------


async def insert_outbox(conn: AsyncConnection, media_ids: Sequence[str], *, now: float) -> None:
    if media_ids:
        await conn.execute(
            outbox.insert(), [{"media_id": media_id, "created_at": now} for media_id in media_ids]
        )


async def outbox_batch(conn: AsyncConnection, limit: int) -> list[tuple[int, Media]]:
    """The oldest undelivered jobs: (outbox row id, its media), in id order."""
    query = (
        sa.select(outbox.c.id.label("outbox_id"), *_columns(with_embedding=False))
        .join(media, media.c.id == outbox.c.media_id)
        .order_by(outbox.c.id)
        .limit(limit)
    )
    return [(row.outbox_id, media_from_row(row)) for row in await conn.execute(query)]


async def delete_outbox(conn: AsyncConnection, outbox_ids: Collection[int]) -> None:
    await conn.execute(sa.delete(outbox).where(outbox.c.id.in_(list(outbox_ids))))


async def outbox_size(conn: AsyncConnection) -> int:
    return int((await conn.execute(sa.select(sa.func.count()).select_from(outbox))).scalar_one())


async def undelivered(conn: AsyncConnection, media_ids: Collection[str]) -> set[str]:
    """Which of ``media_ids`` still wait in the outbox."""
    rows = await conn.execute(
        sa.select(outbox.c.media_id).where(outbox.c.media_id.in_(list(media_ids)))
    )
    return set(rows.scalars())


# -- request ids ---------------------------------------------------------------------------


def _request_from_row(row: Any) -> RequestRecord:
    return RequestRecord(
        request_id=row.request_id,
        digest=row.digest,
        media_ids=tuple(row.media_ids),
        message=row.message,
        created_at=row.created_at,
    )


async def find_requests(
    conn: AsyncConnection, request_ids: Collection[str], *, not_before: float
) -> dict[str, RequestRecord]:
    """The records of ``request_ids`` made at ``not_before`` or later (older ones have expired)."""
    if not request_ids:
        return {}
    rows = await conn.execute(
        sa.select(upload_requests).where(
            upload_requests.c.request_id.in_(list(request_ids)),
            upload_requests.c.created_at >= not_before,
        )
    )
    return {row.request_id: _request_from_row(row) for row in rows}


async def insert_requests(conn: AsyncConnection, records: Sequence[RequestRecord]) -> None:
    if records:
        await conn.execute(
            upload_requests.insert(),
            [
                {
                    "request_id": record.request_id,
                    "digest": record.digest,
                    "media_ids": list(record.media_ids),
                    "message": record.message,
                    "created_at": record.created_at,
                }
                for record in records
            ],
        )


async def delete_expired_requests(
    conn: AsyncConnection, *, before: float, request_ids: Collection[str] | None = None
) -> int:
    """Forget request ids recorded before ``before`` (only ``request_ids``, when given)."""
    query = sa.delete(upload_requests).where(upload_requests.c.created_at < before)
    if request_ids is not None:
        if not request_ids:
            return 0
        query = query.where(upload_requests.c.request_id.in_(list(request_ids)))
    result = await conn.execute(query)
    return int(result.rowcount or 0)


# -- counters ------------------------------------------------------------------------------


async def mirror_revision(conn: AsyncConnection) -> int:
    query = sa.select(counters.c.value).where(counters.c.name == MIRROR_REVISION)
    return int((await conn.execute(query)).scalar_one())


async def set_mirror_revision(conn: AsyncConnection, revision: int) -> None:
    await conn.execute(
        sa.update(counters).where(counters.c.name == MIRROR_REVISION).values(value=revision)
    )
