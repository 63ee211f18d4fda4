"""Statements that change jobs, their attempts and their counts (SQLite and PostgreSQL;
where they differ, the dialect is checked here). Reads are in :mod:`.job_reads`, the result
cache in :mod:`.results`."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.domain.models import (
    ClaimedJob,
    JobError,
    JobSpec,
    JobStatus,
)
from analysis_service.domain.store import AttemptEnd
from analysis_service.storage import schema
from analysis_service.storage.schema import attempts, counters, jobs
from mediatag_common.database import POSTGRESQL, SQLITE, insert

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
