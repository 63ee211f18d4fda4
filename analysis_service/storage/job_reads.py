"""Reads of jobs: one job with its attempts, pages in queue order, owners, counts and due
times."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.domain.models import Attempt, Job, JobStatus
from analysis_service.storage import schema
from analysis_service.storage.events import error_from_row, result_columns, result_from_row
from analysis_service.storage.jobs import QUEUE_ORDER, spec_from_row
from analysis_service.storage.schema import attempts, counters, jobs, results


def owners_of(conn: Connection, media_ids: Collection[str]) -> dict[str, str]:
    """The owner of each known job of ``media_ids``, in one query."""
    rows = conn.execute(
        sa.select(jobs.c.media_id, jobs.c.owner_id).where(jobs.c.media_id.in_(list(media_ids)))
    )
    return {row.media_id: row.owner_id for row in rows}


def known_ids(conn: Connection, media_ids: Collection[str]) -> set[str]:
    rows = conn.execute(sa.select(jobs.c.media_id).where(jobs.c.media_id.in_(list(media_ids))))
    return set(rows.scalars())


def next_due_time(conn: Connection) -> float | None:
    """When the earliest PENDING job becomes claimable."""
    query = sa.select(sa.func.min(jobs.c.next_attempt_at)).where(
        jobs.c.status == JobStatus.PENDING.value
    )
    value = conn.execute(query).scalar_one_or_none()
    return float(value) if value is not None else None


def _job_select(with_embedding: bool) -> sa.Select[Any]:
    return sa.select(jobs, *result_columns(with_embedding)).select_from(
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


def oldest_pending_submission(conn: Connection) -> float | None:
    value = (
        conn.execute(
            sa.select(sa.func.min(jobs.c.submitted_at)).where(
                jobs.c.status == JobStatus.PENDING.value
            )
        )
    ).scalar_one_or_none()
    return float(value) if value is not None else None
