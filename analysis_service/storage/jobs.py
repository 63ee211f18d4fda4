"""Statements on jobs, their attempts, their counts and the result cache (SQLite and
PostgreSQL; where they differ, the dialect is checked here)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.domain.models import (
    Attempt,
    ClaimedJob,
    Job,
    JobError,
    JobResult,
    JobSpec,
    JobStatus,
)
from analysis_service.domain.store import AttemptEnd
from analysis_service.storage import schema
from analysis_service.storage.events import error_from_row, result_from_row
from analysis_service.storage.schema import attempts, counters, jobs, result_claims, results
from mediatag_common.database import POSTGRESQL, SQLITE, insert
from mediatag_common.embeddings import embedding_to_bytes

# Queue order: priority first, then submission time (media id breaks ties).
QUEUE_ORDER = (jobs.c.priority.desc(), jobs.c.submitted_at, jobs.c.media_id)


def spec_from_row(row: Any) -> JobSpec:
    return JobSpec(
        media_id=row.media_id,
        owner_id=row.owner_id,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        content_type=row.content_type,
        content_ref=row.content_ref,
        category=row.category,
        context=dict(row.context),
        priority=row.priority,
    )


def error_values(error: JobError | None) -> dict[str, Any]:
    """Column values recording ``error`` (or clearing it)."""
    return {
        "error_reason": error.reason if error else None,
        "error_message": error.message if error else None,
        "error_transient": error.transient if error else None,
    }


def owners_of(conn: Connection, media_ids: Collection[str]) -> dict[str, str]:
    """The owner of each known job of ``media_ids``, in one query."""
    rows = conn.execute(
        sa.select(jobs.c.media_id, jobs.c.owner_id).where(jobs.c.media_id.in_(list(media_ids)))
    )
    return {row.media_id: row.owner_id for row in rows}


def insert_new_jobs(
    conn: Connection, specs: Sequence[JobSpec], *, now: float, max_attempts: int
) -> set[str]:
    """Insert the jobs whose media id is not yet known; the ids inserted.

    ``ON CONFLICT DO NOTHING``: two submitters of one id (two ingest replicas forwarding the
    same outbox row after a crash) insert it once, neither fails.
    """
    rows = [
        {
            "media_id": spec.media_id,
            "owner_id": spec.owner_id,
            "category": spec.category,
            "context": dict(spec.context),
            "sha256": spec.sha256,
            "size_bytes": spec.size_bytes,
            "content_type": spec.content_type,
            "content_ref": spec.content_ref,
            "priority": spec.priority,
            "status": JobStatus.PENDING.value,
            "attempt": 0,
            "max_attempts": max_attempts,
            "quota_deferrals": 0,
            "next_attempt_at": now,
            "submitted_at": now,
            "updated_at": now,
            "lease_token": 0,
            "reused": False,
            # Set with the event, at the end of the transaction.
            "revision": 0,
        }
        for spec in specs
    ]
    statement = (
        insert(conn, jobs)
        .on_conflict_do_nothing(index_elements=[jobs.c.media_id])
        .returning(jobs.c.media_id)
    )
    return set(conn.execute(statement, rows).scalars())


def _claim_statement(dialect: str) -> sa.Update:
    due = (
        sa.select(jobs.c.media_id)
        .where(
            jobs.c.status == JobStatus.PENDING.value,
            jobs.c.next_attempt_at <= sa.bindparam("claim_now"),
            ~sa.exists().where(counters.c.name == schema.PAUSED, counters.c.value != 0),
        )
        .order_by(*QUEUE_ORDER)
        .limit(sa.bindparam("claim_count"))
    )
    claim = sa.update(jobs).values(
        status=JobStatus.PROCESSING.value,
        attempt=jobs.c.attempt + 1,
        lease_token=jobs.c.lease_token + 1,
        lease_owner=sa.bindparam("claim_holder"),
        lease_expires_at=sa.bindparam("claim_until"),
        updated_at=sa.bindparam("claim_now"),
    )
    if dialect == POSTGRESQL:
        picked = due.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
        claim = claim.where(jobs.c.media_id == picked.c.media_id)
    else:
        claim = claim.where(jobs.c.media_id.in_(due.scalar_subquery()))
    return claim.returning(*jobs.c)


# Built once per dialect: the queue's frequent statements are only looked up in SQLAlchemy's
# compiled cache, not rebuilt for every transaction.
_CLAIM = {dialect: _claim_statement(dialect) for dialect in (POSTGRESQL, SQLITE)}

_START_ATTEMPT = attempts.insert().values(
    media_id=sa.bindparam("start_media_id"),
    number=sa.bindparam("start_number"),
    started_at=sa.bindparam("start_at"),
    outcome="RUNNING",
)


def claim_due(
    conn: Connection, *, holder: str, count: int, now: float, lease_seconds: float
) -> list[Any]:
    """Lease up to ``count`` due PENDING jobs in queue order (none while paused): attempt and
    lease token incremented in the statement itself. The claimed rows, in queue order.

    PostgreSQL: the candidates are locked in a materialised CTE with ``FOR UPDATE SKIP
    LOCKED``, so concurrent claimers (other replicas) take other jobs instead of waiting, and
    the planner cannot run the LIMIT twice. SQLite has one writer: a plain subquery.
    """
    parameters = {
        "claim_now": now,
        "claim_count": count,
        "claim_holder": holder,
        "claim_until": now + lease_seconds,
    }
    rows = list(conn.execute(_CLAIM[conn.dialect.name], parameters).all())
    rows.sort(key=lambda row: (-row.priority, row.submitted_at, row.media_id))
    if rows:
        conn.execute(
            _START_ATTEMPT,
            [
                {"start_media_id": row.media_id, "start_number": row.attempt, "start_at": now}
                for row in rows
            ],
        )
    return rows


def claimed_job(row: Any) -> ClaimedJob:
    return ClaimedJob(spec_from_row(row), row.attempt, row.lease_token, row.quota_deferrals)


def next_due_time(conn: Connection) -> float | None:
    """When the earliest PENDING job becomes claimable."""
    query = sa.select(sa.func.min(jobs.c.next_attempt_at)).where(
        jobs.c.status == JobStatus.PENDING.value
    )
    value = conn.execute(query).scalar_one_or_none()
    return float(value) if value is not None else None


def fenced_update(
    conn: Connection, media_id: str, lease_token: int, values: Mapping[str, Any]
) -> bool:
    """Update a PROCESSING job only if ``lease_token`` still holds its lease."""
    result = conn.execute(
        sa.update(jobs)
        .where(
            jobs.c.media_id == media_id,
            jobs.c.lease_token == lease_token,
            jobs.c.status == JobStatus.PROCESSING.value,
        )
        .values(**values)
    )
    return bool(result.rowcount == 1)


def _processing_statement(dialect: str) -> sa.Select[Any]:
    query = (
        sa.select(
            jobs.c.media_id,
            jobs.c.lease_token,
            jobs.c.next_attempt_at,
            jobs.c.quota_deferrals,
            jobs.c.result_key,
            jobs.c.reused,
        )
        .where(
            jobs.c.media_id.in_(sa.bindparam("media_ids", expanding=True)),
            jobs.c.status == JobStatus.PROCESSING.value,
        )
        .order_by(jobs.c.media_id)
    )
    return query.with_for_update() if dialect == POSTGRESQL else query


_PROCESSING = {dialect: _processing_statement(dialect) for dialect in (POSTGRESQL, SQLITE)}


def _processing_rows(conn: Connection, media_ids: Collection[str]) -> dict[str, Any]:
    """The PROCESSING rows among ``media_ids``, by media id, with what an end may keep.

    PostgreSQL: the rows stay locked until commit, taken in media id order so that two
    transactions ending overlapping groups cannot deadlock. SQLite has one writer.
    """
    rows = conn.execute(_PROCESSING[conn.dialect.name], {"media_ids": list(media_ids)})
    return {row.media_id: row for row in rows}


_END_JOB = (
    sa.update(jobs)
    .where(jobs.c.media_id == sa.bindparam("end_media_id"))
    .values(
        lease_owner=None,
        lease_expires_at=None,
        **{
            name: sa.bindparam(f"end_{name}")
            for name in (
                "status",
                "attempt",
                "updated_at",
                "next_attempt_at",
                "quota_deferrals",
                "result_key",
                "reused",
                "error_reason",
                "error_message",
                "error_transient",
            )
        },
    )
)

_FINISH_ATTEMPT = (
    sa.update(attempts)
    .where(
        attempts.c.media_id == sa.bindparam("finish_media_id"),
        attempts.c.number == sa.bindparam("finish_number"),
        attempts.c.outcome == "RUNNING",
    )
    .values(
        **{
            name: sa.bindparam(f"finish_{name}")
            for name in ("ended_at", "outcome", "error_reason", "error_message", "error_transient")
        }
    )
)


def end_attempts(conn: Connection, ends: Sequence[AttemptEnd], now: float) -> list[bool]:
    """Write each end whose token still holds its job's lease (fenced: a stale one changes
    nothing); whether each was written. A few statements for the whole group."""
    held = _processing_rows(conn, {end.job.spec.media_id for end in ends})
    written: list[bool] = []
    job_values: list[dict[str, Any]] = []
    attempt_values: list[dict[str, Any]] = []
    for end in ends:
        media_id = end.job.spec.media_id
        row = held.get(media_id)
        if row is None or row.lease_token != end.job.lease_token:
            written.append(False)
            continue
        # A second end of this job in the group finds it no longer PROCESSING.
        del held[media_id]
        written.append(True)
        completed = end.status is JobStatus.COMPLETED
        job_values.append(
            {
                "end_media_id": media_id,
                "end_status": end.status.value,
                "end_attempt": end.attempt,
                "end_updated_at": now,
                "end_next_attempt_at": (
                    row.next_attempt_at if end.delay is None else now + end.delay
                ),
                "end_quota_deferrals": (
                    row.quota_deferrals if end.quota_deferrals is None else end.quota_deferrals
                ),
                "end_result_key": end.result_key if completed else row.result_key,
                "end_reused": bool(end.result and end.result.reused) if completed else row.reused,
                **_prefixed("end_", error_values(end.error)),
            }
        )
        attempt_values.append(
            {
                "finish_media_id": media_id,
                "finish_number": end.job.attempt,
                "finish_ended_at": now,
                "finish_outcome": end.outcome.value,
                **_prefixed("finish_", error_values(end.attempt_error or end.error)),
            }
        )
    if job_values:
        conn.execute(_END_JOB, job_values)
        conn.execute(_FINISH_ATTEMPT, attempt_values)
    return written


def _prefixed(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {prefix + name: value for name, value in values.items()}


def reset_for_retry(conn: Connection, media_ids: Sequence[str], *, now: float) -> None:
    """Terminal jobs back to PENDING with a fresh set of attempts."""
    conn.execute(
        sa.update(jobs)
        .where(jobs.c.media_id.in_(list(media_ids)))
        .values(
            status=JobStatus.PENDING.value,
            attempt=0,
            quota_deferrals=0,
            next_attempt_at=now,
            updated_at=now,
            result_key=None,
            reused=False,
            lease_owner=None,
            lease_expires_at=None,
            **error_values(None),
        )
    )


def expired_leases(conn: Connection, now: float) -> list[Any]:
    """PROCESSING jobs whose lease ran out. On PostgreSQL they are locked (skipping those
    another reaper holds): each expiry is handled by one reaper, once."""
    query = sa.select(jobs).where(
        jobs.c.status == JobStatus.PROCESSING.value, jobs.c.lease_expires_at < now
    )
    if conn.dialect.name == POSTGRESQL:
        query = query.with_for_update(skip_locked=True)
    return list(conn.execute(query).all())


def job_rows(
    conn: Connection, media_ids: Collection[str] = (), *, owner_id: str = "", status: JobStatus
) -> list[Any]:
    query = sa.select(jobs).where(jobs.c.status == status.value)
    if media_ids:
        query = query.where(jobs.c.media_id.in_(list(media_ids)))
    if owner_id:
        query = query.where(jobs.c.owner_id == owner_id)
    if conn.dialect.name == POSTGRESQL:
        query = query.with_for_update()
    return list(conn.execute(query.order_by(*QUEUE_ORDER)).all())


def known_ids(conn: Connection, media_ids: Collection[str]) -> set[str]:
    rows = conn.execute(sa.select(jobs.c.media_id).where(jobs.c.media_id.in_(list(media_ids))))
    return set(rows.scalars())


def get_result(conn: Connection, key: str) -> JobResult | None:
    row = conn.execute(sa.select(results).where(results.c.key == key)).first()
    return result_from_row(row, reused=True, with_embedding=True) if row else None


def store_result(conn: Connection, key: str, sha256: str, result: JobResult, now: float) -> None:
    """Insert a result unless the key is already cached (results are deterministic by key)."""
    if result.embedding is None:
        raise ValueError("a stored result needs its embedding")
    conn.execute(
        insert(conn, results)
        .values(
            key=key,
            sha256=sha256,
            analyzer_name=result.analyzer_name,
            analyzer_version=result.analyzer_version,
            tags=list(result.tags),
            embedding=embedding_to_bytes(result.embedding),
            embedding_dimensions=result.embedding_dimensions,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=[results.c.key])
    )


def take_result_claim(
    conn: Connection, key: str, holder: str, *, now: float, lease_seconds: float
) -> bool:
    """Claim the analysis of ``key`` unless another holder's claim is still live or the
    result is already stored."""
    statement = insert(conn, result_claims).values(
        key=key, holder=holder, expires_at=now + lease_seconds
    )
    statement = statement.on_conflict_do_update(
        index_elements=[result_claims.c.key],
        set_={"holder": holder, "expires_at": now + lease_seconds},
        where=sa.or_(result_claims.c.expires_at < now, result_claims.c.holder == holder),
    ).returning(result_claims.c.holder)
    if conn.execute(statement).first() is None:
        return False
    # Checked after the claim, not before: a holder storing its result drops its claim in
    # the same transaction, and the insert above waits for that transaction, so from here
    # (a new statement, read committed) its result is visible.
    if conn.execute(sa.select(results.c.key).where(results.c.key == key)).first() is None:
        return True
    drop_result_claim(conn, key, holder)
    return False


def drop_result_claim(conn: Connection, key: str, holder: str) -> None:
    conn.execute(
        sa.delete(result_claims).where(result_claims.c.key == key, result_claims.c.holder == holder)
    )


def _job_select(with_embedding: bool) -> sa.Select[Any]:
    columns: list[Any] = [
        jobs,
        results.c.tags,
        results.c.embedding_dimensions,
        results.c.analyzer_name,
        results.c.analyzer_version,
    ]
    if with_embedding:
        columns.append(results.c.embedding)
    return sa.select(*columns).select_from(
        jobs.outerjoin(results, jobs.c.result_key == results.c.key)
    )


def _job_from_row(row: Any, with_embedding: bool, attempt_rows: Sequence[Any] = ()) -> Job:
    status = JobStatus(row.status)
    return Job(
        spec=spec_from_row(row),
        status=status,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        next_attempt_at=row.next_attempt_at,
        submitted_at=row.submitted_at,
        updated_at=row.updated_at,
        revision=row.revision,
        lease_token=row.lease_token,
        result=result_from_row(row, row.reused, with_embedding)
        if status is JobStatus.COMPLETED
        else None,
        error=error_from_row(row),
        attempts=tuple(
            Attempt(a.number, a.started_at, a.ended_at, a.outcome, error_from_row(a))
            for a in attempt_rows
        ),
    )


def get_job(conn: Connection, media_id: str, *, with_embedding: bool) -> Job | None:
    row = conn.execute(_job_select(with_embedding).where(jobs.c.media_id == media_id)).first()
    if row is None:
        return None
    attempt_rows = (
        conn.execute(
            sa.select(attempts).where(attempts.c.media_id == media_id).order_by(attempts.c.id)
        )
    ).all()
    return _job_from_row(row, with_embedding, attempt_rows)


def list_jobs(
    conn: Connection,
    *,
    status: JobStatus | None,
    owner_id: str,
    error_reason: str,
    after: Sequence[Any] | None,
    limit: int,
    with_embedding: bool,
) -> list[Job]:
    """A page of jobs in queue order, after the key ``(priority, submitted_at, media_id)``."""
    query = _job_select(with_embedding).order_by(*QUEUE_ORDER).limit(limit)
    if status is not None:
        query = query.where(jobs.c.status == status.value)
    if owner_id:
        query = query.where(jobs.c.owner_id == owner_id)
    if error_reason:
        query = query.where(jobs.c.error_reason == error_reason)
    if after is not None:
        priority, submitted_at, media_id = after
        query = query.where(
            sa.or_(
                jobs.c.priority < priority,
                sa.and_(jobs.c.priority == priority, jobs.c.submitted_at > submitted_at),
                sa.and_(
                    jobs.c.priority == priority,
                    jobs.c.submitted_at == submitted_at,
                    jobs.c.media_id > media_id,
                ),
            )
        )
    rows = conn.execute(query).all()
    by_id: dict[str, list[Any]] = {row.media_id: [] for row in rows}
    if by_id:
        attempt_rows = conn.execute(
            sa.select(attempts).where(attempts.c.media_id.in_(list(by_id))).order_by(attempts.c.id)
        )
        for attempt_row in attempt_rows:
            by_id[attempt_row.media_id].append(attempt_row)
    return [_job_from_row(row, with_embedding, by_id[row.media_id]) for row in rows]


def counts_by_status(conn: Connection) -> dict[JobStatus, int]:
    """Jobs by status, from the counts kept with each transition (constant time)."""
    rows = conn.execute(
        sa.select(counters.c.name, counters.c.value).where(
            counters.c.name.in_([schema.job_count(status) for status in JobStatus])
        )
    )
    by_name = {name: int(value) for name, value in rows}
    return {status: by_name.get(schema.job_count(status), 0) for status in JobStatus}


def adjust_counts(conn: Connection, deltas: Mapping[JobStatus, int]) -> None:
    """Apply the transaction's changes to the job counts, in a fixed row order (concurrent
    transactions lock the rows in the same order: no deadlock)."""
    changes = [
        {"row": schema.job_count(status), "delta": delta}
        for status, delta in sorted(deltas.items())
        if delta
    ]
    if changes:
        conn.execute(
            sa.update(counters)
            .where(counters.c.name == sa.bindparam("row"))
            .values(value=counters.c.value + sa.bindparam("delta")),
            changes,
        )


def oldest_pending_submission(conn: Connection) -> float | None:
    value = (
        conn.execute(
            sa.select(sa.func.min(jobs.c.submitted_at)).where(
                jobs.c.status == JobStatus.PENDING.value
            )
        )
    ).scalar_one_or_none()
    return float(value) if value is not None else None
