"""The ingest service's queries of media, request ids and the mirror's revision: plain
functions of a synchronous SQLAlchemy connection, run inside the transactions of
:mod:`ingest_service.storage.sql_store`.

Where SQLite and PostgreSQL differ (locking out media inserts, the larger of two values),
the function looks at ``conn.dialect``; everything else is the same SQL on both. The outbox's
queries are in :mod:`ingest_service.storage.outbox`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ingest_service.domain.models import (
    AnalysisFailure,
    AnalysisOutcome,
    Media,
    MediaKind,
    ProcessingStatus,
    RequestRecord,
    StatusUpdate,
)
from ingest_service.domain.store import AnalysisState
from ingest_service.storage.schema import (
    MIRROR_REVISION,
    counters,
    media,
    outbox,
    upload_requests,
)
from mediatag_common.database import POSTGRESQL
from mediatag_common.embeddings import embedding_from_bytes, embedding_to_bytes

# ListMedia order: newest first; the id breaks ties within one upload.
LIST_ORDER = (media.c.created_at.desc(), media.c.id.desc())
# Beyond the time a transaction asks to stay idle, before PostgreSQL ends it.
IDLE_MARGIN_MS = 5000


def is_postgresql(conn: Connection) -> bool:
    return conn.dialect.name == POSTGRESQL


# -- media ---------------------------------------------------------------------------------


def media_columns(with_embedding: bool) -> list[Any]:
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


def insert_media(conn: Connection, items: Sequence[Media]) -> None:
    if not items:
        return
    conn.execute(
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


# Built once: ReadMediaContent looks an item up for every job analysed.
_GET_MEDIA = {
    with_embedding: sa.select(*media_columns(with_embedding)).where(
        media.c.id == sa.bindparam("media_id")
    )
    for with_embedding in (False, True)
}


def get_media(conn: Connection, media_id: str, *, with_embedding: bool) -> Media | None:
    row = conn.execute(_GET_MEDIA[with_embedding], {"media_id": media_id}).first()
    return media_from_row(row) if row is not None else None


def media_owners(conn: Connection, media_ids: Sequence[str]) -> dict[str, str]:
    """The owner of each known item of ``media_ids``, in one query."""
    rows = conn.execute(
        sa.select(media.c.id, media.c.owner_id).where(media.c.id.in_(list(media_ids)))
    )
    return {row.id: row.owner_id for row in rows}


# Built once: an expanding parameter keeps one compiled form for every list of ids.
_GET_MEDIA_MANY = sa.select(*media_columns(with_embedding=False)).where(
    media.c.id.in_(sa.bindparam("media_ids", expanding=True))
)


def get_media_many(conn: Connection, media_ids: Sequence[str]) -> list[Media]:
    """The items of ``media_ids`` (embeddings left out), in that order; unknown ids are skipped."""
    rows = conn.execute(_GET_MEDIA_MANY, {"media_ids": list(media_ids)})
    found = {row.id: media_from_row(row) for row in rows}
    return [found[media_id] for media_id in media_ids if media_id in found]


def list_media(
    conn: Connection,
    *,
    owner_id: str | None,
    status: ProcessingStatus | None,
    after: tuple[float, str] | None,
    limit: int,
    with_embedding: bool,
) -> list[Media]:
    """Items newest first, of one owner or every owner, starting after ``(created_at, id)``."""
    query = sa.select(*media_columns(with_embedding))
    if owner_id is not None:
        query = query.where(media.c.owner_id == owner_id)
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
    rows = conn.execute(query.order_by(*LIST_ORDER).limit(limit))
    return [media_from_row(row) for row in rows]


def lock_out_media_inserts(conn: Connection, *, open_for: float) -> None:
    """Until this transaction ends, no other transaction (of any process) commits a new
    media row: PostgreSQL's SHARE lock on the table waits for inserts in flight and holds
    off new ones; on SQLite a write takes the database's one write lock now (a transaction
    only reading would not hold it). The transaction may then stay idle for ``open_for``
    seconds without PostgreSQL ending it (and letting go of the lock)."""
    if is_postgresql(conn):
        idle = f"{math.ceil(open_for * 1000) + IDLE_MARGIN_MS}ms"
        conn.execute(
            sa.select(sa.func.set_config("idle_in_transaction_session_timeout", idle, True))
        )
        conn.execute(sa.text("LOCK TABLE media IN SHARE MODE"))
    else:
        conn.execute(
            sa.update(counters)
            .where(counters.c.name == MIRROR_REVISION)
            .values(value=counters.c.value)
        )


def referenced_sha256(conn: Connection, candidates: Collection[str]) -> set[str]:
    """Which of the blobs ``candidates`` (hex SHA-256) some media row names."""
    rows = conn.execute(
        sa.select(media.c.sha256).where(media.c.sha256.in_(list(candidates))).distinct()
    )
    return {row.sha256 for row in rows}


def analysis_states(conn: Connection, media_ids: Collection[str]) -> dict[str, AnalysisState]:
    """Each known item's status and whether its job still waits in the outbox."""
    waiting = sa.exists().where(outbox.c.media_id == media.c.id)
    rows = conn.execute(
        sa.select(media.c.id, media.c.status, waiting.label("in_outbox")).where(
            media.c.id.in_(list(media_ids))
        )
    )
    return {
        row.id: AnalysisState(ProcessingStatus(row.status), bool(row.in_outbox)) for row in rows
    }


def lock_media(conn: Connection, media_ids: Collection[str]) -> None:
    """On PostgreSQL, lock the rows of ``media_ids`` in the order of their ids (SQLite's one
    writer holds the whole database already)."""
    if media_ids and is_postgresql(conn):
        conn.execute(
            sa.select(media.c.id)
            .where(media.c.id.in_(sorted(media_ids)))
            .order_by(media.c.id)
            .with_for_update()
        )


def apply_status(conn: Connection, update: StatusUpdate, *, quiet_when_unchanged: bool) -> bool:
    """Apply ``update`` unless the row already holds that revision or a later one.

    False when nothing changed (an unknown media id, or a stale revision), and with
    ``quiet_when_unchanged`` when the row's status and attempt stay as they were. On
    PostgreSQL a concurrent transaction applying the same revision waits for the row, then
    finds it current and changes nothing.
    """
    unchanged = False
    if quiet_when_unchanged:
        # The row is locked (lock_media), so what is read here is what is updated.
        before = conn.execute(
            sa.select(media.c.status, media.c.attempt).where(media.c.id == update.media_id)
        ).one_or_none()
        unchanged = before is not None and tuple(before) == (update.status.value, update.attempt)
    result = conn.execute(
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
    return bool(result.rowcount) and not unchanged


def forget_revisions(conn: Connection) -> None:
    """Every item's revision and the mirror's back to 0 (see IngestStore.forget_revisions)."""
    conn.execute(sa.update(media).where(media.c.status_revision != 0).values(status_revision=0))
    conn.execute(sa.update(counters).where(counters.c.name == MIRROR_REVISION).values(value=0))


def unknown_to_analysis(conn: Connection) -> list[str]:
    """Items analysed there that no change has reached yet and that are not in the outbox."""
    waiting = sa.exists().where(outbox.c.media_id == media.c.id)
    rows = conn.execute(
        sa.select(media.c.id)
        .where(
            media.c.status_revision == 0,
            media.c.status != ProcessingStatus.NOT_APPLICABLE.value,
            ~waiting,
        )
        .order_by(media.c.created_at, media.c.id)
    )
    return list(rows.scalars())


# -- request ids ---------------------------------------------------------------------------


def _request_from_row(row: Any) -> RequestRecord:
    return RequestRecord(
        request_id=row.request_id,
        digest=row.digest,
        media_ids=tuple(row.media_ids),
        message=row.message,
        created_at=row.created_at,
    )


def find_requests(
    conn: Connection, request_ids: Collection[str], *, not_before: float
) -> dict[str, RequestRecord]:
    """The records of ``request_ids`` made at ``not_before`` or later (older ones have expired)."""
    if not request_ids:
        return {}
    rows = conn.execute(
        sa.select(upload_requests).where(
            upload_requests.c.request_id.in_(list(request_ids)),
            upload_requests.c.created_at >= not_before,
        )
    )
    return {row.request_id: _request_from_row(row) for row in rows}


def insert_requests(
    conn: Connection, records: Sequence[RequestRecord], *, expire_before: float
) -> set[str]:
    """Record ``records`` (distinct ids) where no unexpired record has their id; an expired
    one is replaced. The ids recorded.

    One ``INSERT … ON CONFLICT``: of concurrent transactions recording one id, the second
    waits for the first and then finds the id taken.
    """
    if not records:
        return set()
    dialect_insert = postgresql.insert if is_postgresql(conn) else sqlite.insert
    # Inserted in id order, so two transactions recording the same ids lock them in the
    # same order (and never deadlock).
    ordered = sorted(records, key=lambda record: record.request_id)
    statement = dialect_insert(upload_requests).values(
        [
            {
                "request_id": record.request_id,
                "digest": record.digest,
                "media_ids": list(record.media_ids),
                "message": record.message,
                "created_at": record.created_at,
            }
            for record in ordered
        ]
    )
    replacing = {
        column: statement.excluded[column]
        for column in ("digest", "media_ids", "message", "created_at")
    }
    statement = statement.on_conflict_do_update(
        index_elements=[upload_requests.c.request_id],
        set_=replacing,
        where=upload_requests.c.created_at < expire_before,
    )
    return set(conn.execute(statement.returning(upload_requests.c.request_id)).scalars())


def delete_expired_requests(conn: Connection, *, before: float) -> int:
    """Forget request ids recorded before ``before``."""
    result = conn.execute(sa.delete(upload_requests).where(upload_requests.c.created_at < before))
    return int(result.rowcount or 0)


# -- the mirror's revision -----------------------------------------------------------------


def mirror_revision(conn: Connection) -> int:
    query = sa.select(counters.c.value).where(counters.c.name == MIRROR_REVISION)
    return int(conn.execute(query).scalar_one())


def advance_mirror_revision(conn: Connection, revision: int) -> None:
    """Raise the mirror's revision to ``revision``; a lower one changes nothing (mirrors
    of several processes write it, each at its own pace)."""
    larger = sa.func.greatest if is_postgresql(conn) else sa.func.max
    conn.execute(
        sa.update(counters)
        .where(counters.c.name == MIRROR_REVISION)
        .values(value=larger(counters.c.value, revision))
    )
