"""Statements that change jobs, their attempts and their counts (SQLite and PostgreSQL;
where they differ, the dialect is checked here). Reads are in :mod:`.job_reads`, the result
cache in :mod:`.results`."""

from __future__ import annotations

import json
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
from analysis_service.storage import schema
from analysis_service.storage.clock import POSTGRESQL_NOW, database_now
from analysis_service.storage.schema import attempts, counters, jobs
from mediatag_common.database import (
    POSTGRESQL,
    SQLITE,
    array_parameters,
    insert,
    unnest_parameters,
)
from mediatag_common.database import database_now as read_database_now

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


def insert_new_jobs(conn: Connection, specs: Sequence[JobSpec], *, max_attempts: int) -> set[str]:
    """Insert the jobs whose media id is not yet known, due now; the ids inserted.

    ``ON CONFLICT DO NOTHING``: two submitters of one id (two ingest replicas forwarding the
    same outbox row after a crash) insert it once, neither fails.
    """
    if conn.dialect.name == POSTGRESQL:
        parameters: dict[str, Any] = array_parameters(
            _SPEC_COLUMNS,
            [{**_spec_values(spec), "context": json.dumps(dict(spec.context))} for spec in specs],
        )
        parameters.update(_NEW_JOB_STATE, max_attempts=max_attempts)
        return set(conn.execute(_PG_INSERT_NEW_JOBS, parameters).scalars())
    now = read_database_now(conn)
    rows = [
        {
            **_spec_values(spec),
            **_NEW_JOB_STATE,
            "max_attempts": max_attempts,
            **dict.fromkeys(_SUBMISSION_TIMES, now),
        }
        for spec in specs
    ]
    statement = (
        insert(conn, jobs)
        .on_conflict_do_nothing(index_elements=[jobs.c.media_id])
        .returning(jobs.c.media_id)
    )
    return set(conn.execute(statement, rows).scalars())


def _spec_values(spec: JobSpec) -> dict[str, Any]:
    return {
        "media_id": spec.media_id,
        "owner_id": spec.owner_id,
        "category": spec.category,
        "context": dict(spec.context),
        "sha256": spec.sha256,
        "size_bytes": spec.size_bytes,
        "content_type": spec.content_type,
        "content_ref": spec.content_ref,
        "priority": spec.priority,
    }


# A new job's state; its revision is set with its event, at the end of the transaction.
_NEW_JOB_STATE = {
    "status": JobStatus.PENDING.value,
    "attempt": 0,
    "quota_deferrals": 0,
    "lease_token": 0,
    "reused": False,
    "revision": 0,
}
_SUBMISSION_TIMES = ("next_attempt_at", "submitted_at", "updated_at")
_SPEC_COLUMNS = (
    ("media_id", "text"),
    ("owner_id", "text"),
    ("category", "text"),
    ("context", "json"),
    ("sha256", "text"),
    ("size_bytes", "bigint"),
    ("content_type", "text"),
    ("content_ref", "text"),
    ("priority", "integer"),
)
# PostgreSQL: one statement of fixed text over arrays (prepared once, where a multi-row
# VALUES list would be new text for every batch size), on the database's clock.
_PG_INSERT_NEW_JOBS = sa.text(
    f"""
    WITH clock AS MATERIALIZED (SELECT {POSTGRESQL_NOW} AS now)
    INSERT INTO jobs ({", ".join(name for name, _ in _SPEC_COLUMNS)}, max_attempts,
        {", ".join(_NEW_JOB_STATE)}, {", ".join(_SUBMISSION_TIMES)})
    SELECT {", ".join(f"job.{name}" for name, _ in _SPEC_COLUMNS)},
        :max_attempts, {", ".join(f":{name}" for name in _NEW_JOB_STATE)},
        {", ".join("clock.now" for _ in _SUBMISSION_TIMES)}
    FROM clock, {unnest_parameters(_SPEC_COLUMNS, "job")}
    ORDER BY job.position
    ON CONFLICT (media_id) DO NOTHING
    RETURNING media_id
    """
)


def _claim_statement(dialect: str) -> sa.Executable:
    now: Any = sa.bindparam("claim_now")
    if dialect == POSTGRESQL:
        # The database's clock, read once for the statement (a volatile CTE is materialised).
        now = sa.select(database_now(POSTGRESQL).label("now")).cte("clock").c.now
        now = sa.select(now).scalar_subquery()
    due = (
        sa.select(jobs.c.media_id)
        .where(
            jobs.c.status == JobStatus.PENDING.value,
            jobs.c.next_attempt_at <= now,
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
        lease_expires_at=now + sa.bindparam("claim_lease_seconds"),
        updated_at=now,
    )
    if dialect == SQLITE:
        return claim.where(jobs.c.media_id.in_(due.scalar_subquery())).returning(*jobs.c)
    # PostgreSQL: the attempts are started in the same statement (one round trip).
    picked = due.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
    claimed = claim.where(jobs.c.media_id == picked.c.media_id).returning(*jobs.c).cte("claimed")
    started = sa.insert(attempts).from_select(
        ["media_id", "number", "started_at", "outcome"],
        sa.select(
            claimed.c.media_id, claimed.c.attempt, claimed.c.updated_at, sa.literal("RUNNING")
        ),
    )
    return sa.select(claimed).add_cte(started.cte("started"))


# Built once per dialect: the queue's frequent statements are only looked up in SQLAlchemy's
# compiled cache, not rebuilt for every transaction.
_CLAIM = {dialect: _claim_statement(dialect) for dialect in (POSTGRESQL, SQLITE)}

_START_ATTEMPT = attempts.insert().values(
    media_id=sa.bindparam("start_media_id"),
    number=sa.bindparam("start_number"),
    started_at=sa.bindparam("start_at"),
    outcome="RUNNING",
)


def claim_due(conn: Connection, *, holder: str, count: int, lease_seconds: float) -> list[Any]:
    """Lease up to ``count`` due PENDING jobs in queue order (none while paused): attempt and
    lease token incremented in the statement itself, each claim's attempt started. The
    claimed rows, in queue order.

    PostgreSQL: the candidates are locked in a materialised CTE with ``FOR UPDATE SKIP
    LOCKED``, so concurrent claimers (other replicas) take other jobs instead of waiting, and
    the planner cannot run the LIMIT twice. SQLite has one writer: a plain subquery.
    """
    parameters: dict[str, Any] = {
        "claim_count": count,
        "claim_holder": holder,
        "claim_lease_seconds": lease_seconds,
    }
    dialect = conn.dialect.name
    if dialect == SQLITE:
        parameters["claim_now"] = read_database_now(conn)
    rows = list(conn.execute(_CLAIM[dialect], parameters).all())
    rows.sort(key=lambda row: (-row.priority, row.submitted_at, row.media_id))
    if rows and dialect == SQLITE:
        conn.execute(
            _START_ATTEMPT,
            [
                {
                    "start_media_id": row.media_id,
                    "start_number": row.attempt,
                    "start_at": row.updated_at,
                }
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
