"""The event log and its revision counter."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.domain.models import JobError, JobResult, JobStatus, StatusEvent
from analysis_service.storage import schema
from analysis_service.storage.clock import POSTGRESQL_NOW as PG_NOW
from analysis_service.storage.schema import counters, jobs, results
from analysis_service.storage.schema import events as events_table
from mediatag_common.database import (
    POSTGRESQL,
    array_parameters,
    database_now,
    unnest_parameters,
)
from mediatag_common.embeddings import embedding_from_bytes

# The channel every replica's tailer listens on; the payload is the newest revision.
NOTIFY_CHANNEL = "mediatag_analysis_events"


@dataclass(frozen=True)
class EventDraft:
    """A status change before it has its revision and time."""

    media_id: str
    owner_id: str
    status: JobStatus
    previous_status: JobStatus | None
    attempt: int
    result: JobResult | None = None
    result_key: str | None = None
    error: JobError | None = None
    next_attempt_at: float | None = None

    def event(self, revision: int, time: float) -> StatusEvent:
        """The change as written, with its revision and time."""
        return StatusEvent(
            revision=revision,
            media_id=self.media_id,
            owner_id=self.owner_id,
            status=self.status,
            previous_status=self.previous_status,
            attempt=self.attempt,
            event_time=time,
            result=self.result,
            error=self.error,
            next_attempt_at=self.next_attempt_at,
        )


def record(conn: Connection, drafts: Sequence[EventDraft]) -> list[StatusEvent]:
    """Keep the job counts and append the events of this transaction, as its last statements.

    The counter row takes the revisions: updating it locks it until commit, so transactions
    that write events commit in revision order and a rolled-back one leaves no gap (a
    sequence would do neither). It is updated in the transaction's last statements, to hold
    that lock briefly; the event time is read under it, so event times follow revisions too.
    On PostgreSQL they are one statement (one round trip, see ``_PG_RECORD``), whose one
    NOTIFY carries the newest revision to every replica's tailer.
    """
    if not drafts:
        return []
    deltas: Counter[JobStatus] = Counter()
    for draft in drafts:
        deltas[draft.status] += 1
        if draft.previous_status is not None:
            deltas[draft.previous_status] -= 1
    # In a fixed row order: concurrent transactions lock the rows in the same order.
    changes = [
        (schema.job_count(status), delta) for status, delta in sorted(deltas.items()) if delta
    ]
    count = len(drafts)
    if conn.dialect.name == POSTGRESQL:
        row = conn.execute(_PG_RECORD, _pg_record_parameters(drafts, changes)).one()
        last, now = int(row.last), float(row.now)
    else:
        _adjust_counts(conn, changes)
        last, now = int(conn.execute(_BUMP, {"count": count}).scalar_one()), database_now(conn)
    first = last - count + 1
    events = [draft.event(first + i, now) for i, draft in enumerate(drafts)]
    if conn.dialect.name != POSTGRESQL:
        conn.execute(
            _INSERT_EVENT,
            [
                {**_draft_row(draft), "revision": event.revision, "event_time": now}
                for event, draft in zip(events, drafts, strict=True)
            ],
        )
        conn.execute(
            _SET_JOB_REVISION,
            [{"event_media_id": e.media_id, "event_revision": e.revision} for e in events],
        )
    return events


def _adjust_counts(conn: Connection, changes: Sequence[tuple[str, int]]) -> None:
    if changes:
        conn.execute(_ADJUST_COUNT, [{"row": name, "delta": delta} for name, delta in changes])


# Built once: the statements every status change runs.
_ADJUST_COUNT = (
    sa.update(counters)
    .where(counters.c.name == sa.bindparam("row"))
    .values(value=counters.c.value + sa.bindparam("delta"))
)
_BUMP = (
    sa.update(counters)
    .where(counters.c.name == schema.REVISION)
    .values(value=counters.c.value + sa.bindparam("count"))
    .returning(counters.c.value)
)
_INSERT_EVENT = events_table.insert()
_SET_JOB_REVISION = (
    sa.update(jobs)
    .where(jobs.c.media_id == sa.bindparam("event_media_id"))
    .values(revision=sa.bindparam("event_revision"))
)

# PostgreSQL: the counter, the counts, the events and each job's newest revision in one
# statement. The counter row is locked first (``bump`` is what the final SELECT reads; the
# parts nothing reads run after it), so every transaction that adjusts the counts holds it
# already: none can deadlock over the count rows. The event time is read under that lock,
# and the transaction's one NOTIFY goes with it (sent at commit).
_DRAFT_COLUMNS = (
    ("media_id", "text"),
    ("owner_id", "text"),
    ("status", "text"),
    ("previous_status", "text"),
    ("attempt", "integer"),
    ("result_key", "text"),
    ("reused", "boolean"),
    ("error_reason", "text"),
    ("error_message", "text"),
    ("error_transient", "boolean"),
    ("next_attempt_at", "float8"),
)
_PG_RECORD = sa.text(
    f"""
    WITH drafts AS MATERIALIZED (
        SELECT * FROM {unnest_parameters(_DRAFT_COLUMNS, "draft")}
    ),
    bump AS (
        UPDATE counters SET value = value + :count WHERE name = '{schema.REVISION}'
        RETURNING value AS last, {PG_NOW} AS now,
            pg_notify('{NOTIFY_CHANNEL}', CAST(value AS text)) AS notified
    ),
    counted AS (
        UPDATE counters SET value = counters.value + change.delta
        FROM bump, unnest(CAST(:count_rows AS text[]), CAST(:count_deltas AS bigint[]))
            AS change(name, delta)
        WHERE counters.name = change.name
    ),
    appended AS (
        INSERT INTO events (revision, event_time, {", ".join(name for name, _ in _DRAFT_COLUMNS)})
        SELECT bump.last - :count + draft.position, bump.now,
            {", ".join(f"draft.{name}" for name, _ in _DRAFT_COLUMNS)}
        FROM bump, drafts AS draft
    ),
    revised AS (
        UPDATE jobs SET revision = newest.revision
        FROM (
            SELECT DISTINCT ON (draft.media_id)
                draft.media_id, bump.last - :count + draft.position AS revision
            FROM bump, drafts AS draft
            ORDER BY draft.media_id, draft.position DESC
        ) AS newest
        WHERE jobs.media_id = newest.media_id
    )
    SELECT last, now FROM bump
    """
)


def _pg_record_parameters(
    drafts: Sequence[EventDraft], changes: Sequence[tuple[str, int]]
) -> dict[str, Any]:
    parameters: dict[str, Any] = array_parameters(
        _DRAFT_COLUMNS, [_draft_row(draft) for draft in drafts]
    )
    parameters["count"] = len(drafts)
    parameters["count_rows"] = [name for name, _ in changes]
    parameters["count_deltas"] = [delta for _, delta in changes]
    return parameters


def read_counter(conn: Connection, name: str, *, lock: bool = False) -> int:
    """The counter's value; ``lock``: its row locked until commit (PostgreSQL)."""
    query = sa.select(counters.c.value).where(counters.c.name == name)
    if lock:
        query = query.with_for_update()
    return int(conn.execute(query).scalar_one())


def write_counter(conn: Connection, name: str, value: int) -> None:
    conn.execute(sa.update(counters).where(counters.c.name == name).values(value=value))


def notify_replicas(conn: Connection) -> None:
    """PostgreSQL: wake every replica's tailer, and so its workers, at commit, with a
    notification that carries no revision (the tailers read the log all the same)."""
    conn.execute(sa.text(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"))


def _draft_row(draft: EventDraft) -> dict[str, Any]:
    """The columns of the draft's event row, but its revision and time."""
    return {
        "media_id": draft.media_id,
        "owner_id": draft.owner_id,
        "status": draft.status.value,
        "previous_status": draft.previous_status.value if draft.previous_status else None,
        "attempt": draft.attempt,
        "result_key": draft.result_key,
        "reused": bool(draft.result and draft.result.reused),
        "error_reason": draft.error.reason if draft.error else None,
        "error_message": draft.error.message if draft.error else None,
        "error_transient": draft.error.transient if draft.error else None,
        "next_attempt_at": draft.next_attempt_at,
    }


def result_columns(with_embedding: bool) -> list[Any]:
    """The columns of ``results`` that :func:`result_from_row` reads."""
    columns: list[Any] = [
        results.c.tags,
        results.c.embedding_dimensions,
        results.c.analyzer_name,
        results.c.analyzer_version,
    ]
    if with_embedding:
        columns.append(results.c.embedding)
    return columns


def result_from_row(row: Any, reused: bool, with_embedding: bool) -> JobResult | None:
    """The JobResult of a row joined with ``results`` (None when it has no result)."""
    if row.tags is None:
        return None
    embedding = embedding_from_bytes(row.embedding) if with_embedding else None
    return JobResult(
        tags=tuple(row.tags),
        embedding=embedding,
        embedding_dimensions=row.embedding_dimensions,
        analyzer_name=row.analyzer_name,
        analyzer_version=row.analyzer_version,
        reused=reused,
    )


def error_from_row(row: Any) -> JobError | None:
    if row.error_reason is None:
        return None
    return JobError(row.error_reason, row.error_message or "", bool(row.error_transient))


def read_events(
    conn: Connection,
    *,
    after_revision: int,
    limit: int,
    media_ids: Collection[str] = (),
    owner_id: str = "",
    with_embedding: bool = False,
) -> list[StatusEvent]:
    """Events with revision > ``after_revision`` matching the filter, oldest first."""
    query = (
        sa.select(events_table, *result_columns(with_embedding))
        .select_from(events_table.outerjoin(results, events_table.c.result_key == results.c.key))
        .where(events_table.c.revision > after_revision)
        .order_by(events_table.c.revision)
        .limit(limit)
    )
    if media_ids:
        query = query.where(events_table.c.media_id.in_(list(media_ids)))
    if owner_id:
        query = query.where(events_table.c.owner_id == owner_id)
    rows = conn.execute(query).all()
    return [
        StatusEvent(
            revision=row.revision,
            media_id=row.media_id,
            owner_id=row.owner_id,
            status=JobStatus(row.status),
            previous_status=JobStatus(row.previous_status) if row.previous_status else None,
            attempt=row.attempt,
            event_time=row.event_time,
            result=result_from_row(row, row.reused, with_embedding),
            error=error_from_row(row),
            next_attempt_at=row.next_attempt_at,
        )
        for row in rows
    ]


def current_states(
    conn: Connection,
    *,
    after_media_id: str,
    limit: int,
    media_ids: Collection[str] = (),
    owner_id: str = "",
    with_embedding: bool = False,
) -> list[StatusEvent]:
    """The current state of up to ``limit`` matching jobs whose media id sorts after
    ``after_media_id``, as initial-state events, by media id (the primary key: a page is an
    index range, and a job keeps its place in that order whatever changes)."""
    query = (
        sa.select(
            jobs.c.media_id,
            jobs.c.owner_id,
            jobs.c.status,
            jobs.c.attempt,
            jobs.c.updated_at,
            jobs.c.revision,
            jobs.c.reused,
            jobs.c.error_reason,
            jobs.c.error_message,
            jobs.c.error_transient,
            jobs.c.next_attempt_at,
            *result_columns(with_embedding),
        )
        .select_from(jobs.outerjoin(results, jobs.c.result_key == results.c.key))
        .where(jobs.c.media_id > after_media_id)
        .order_by(jobs.c.media_id)
        .limit(limit)
    )
    if media_ids:
        query = query.where(jobs.c.media_id.in_(list(media_ids)))
    if owner_id:
        query = query.where(jobs.c.owner_id == owner_id)
    rows = conn.execute(query).all()
    states = []
    for row in rows:
        status = JobStatus(row.status)
        states.append(
            StatusEvent(
                revision=row.revision,
                media_id=row.media_id,
                owner_id=row.owner_id,
                status=status,
                previous_status=None,
                attempt=row.attempt,
                event_time=row.updated_at,
                result=result_from_row(row, row.reused, with_embedding)
                if status is JobStatus.COMPLETED
                else None,
                error=error_from_row(row),
                next_attempt_at=row.next_attempt_at if status is JobStatus.PENDING else None,
                initial_state=True,
            )
        )
    return states


def compact(conn: Connection, *, before_time: float, keep_last: int) -> int:
    """Drop events older than ``before_time`` or beyond the newest ``keep_last``.

    Returns the new compaction watermark: every revision at or below it is gone.
    """
    # Every replica compacts: the watermark's row is locked first, so that a compaction
    # waits for one under way and starts from its watermark. Else the later commit could
    # set a lower watermark than events already gone, and a reader resuming between the two
    # would be given the log with a hole instead of REVISION_COMPACTED.
    compacted_through = read_counter(conn, schema.COMPACTED_THROUGH, lock=True)
    newest = read_counter(conn, schema.REVISION)
    cutoff_by_count = newest - keep_last
    cutoff_by_time = (
        conn.execute(
            sa.select(sa.func.max(events_table.c.revision)).where(
                events_table.c.event_time < before_time
            )
        )
    ).scalar_one_or_none() or 0
    watermark = max(cutoff_by_count, int(cutoff_by_time), compacted_through)
    conn.execute(sa.delete(events_table).where(events_table.c.revision <= watermark))
    write_counter(conn, schema.COMPACTED_THROUGH, watermark)
    return watermark
