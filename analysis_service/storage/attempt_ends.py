"""Ending attempts: a group of ends (completions, retries, deferrals, releases, expiries)
written together, each fenced by its lease token (a stale one changes nothing)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.domain.models import JobStatus
from analysis_service.domain.store import AttemptEnd
from analysis_service.storage.clock import POSTGRESQL_NOW
from analysis_service.storage.jobs import error_values
from analysis_service.storage.schema import attempts, jobs
from mediatag_common.database import POSTGRESQL, array_parameters, unnest_parameters
from mediatag_common.database import database_now as read_database_now


def end_attempts(conn: Connection, ends: Sequence[AttemptEnd]) -> list[float | None]:
    """Write each end whose token still holds its job's lease; for each end, the time (on
    the database's clock) it was written at, or None when it was fenced out."""
    if conn.dialect.name == POSTGRESQL:
        return _postgresql_end_attempts(conn, ends)
    return _sqlite_end_attempts(conn, ends)


# PostgreSQL: one statement (one round trip) per group. The PROCESSING rows are locked in
# media id order (two transactions ending overlapping groups cannot deadlock); each end is
# written only if its token still holds the lease, its attempt finished with it.
END_COLUMNS = (
    ("media_id", "text"),
    ("lease_token", "integer"),
    ("status", "text"),
    ("attempt", "integer"),
    ("delay", "float8"),
    ("quota_deferrals", "integer"),
    ("result_key", "text"),
    ("reused", "boolean"),
    ("error_reason", "text"),
    ("error_message", "text"),
    ("error_transient", "boolean"),
    ("number", "integer"),
    ("outcome", "text"),
    ("attempt_error_reason", "text"),
    ("attempt_error_message", "text"),
    ("attempt_error_transient", "boolean"),
)
PROCESSING_STATUS = f"'{JobStatus.PROCESSING.value}'"


def ending_assignments(now: str) -> str:
    """SQL: the SET list that writes the end of attempt ``ending`` (a row of END_COLUMNS)
    to its job at ``now`` (an SQL expression), its lease let go."""
    completed = f"'{JobStatus.COMPLETED.value}'"
    return f"""
            status = ending.status,
            attempt = ending.attempt,
            updated_at = {now},
            next_attempt_at = COALESCE({now} + ending.delay, jobs.next_attempt_at),
            quota_deferrals = COALESCE(ending.quota_deferrals, jobs.quota_deferrals),
            result_key = CASE WHEN ending.status = {completed}
                THEN ending.result_key ELSE jobs.result_key END,
            reused = CASE WHEN ending.status = {completed}
                THEN ending.reused ELSE jobs.reused END,
            error_reason = ending.error_reason,
            error_message = ending.error_message,
            error_transient = ending.error_transient,
            lease_owner = NULL,
            lease_expires_at = NULL"""


_PG_END = sa.text(
    f"""
    WITH ends AS MATERIALIZED (
        SELECT * FROM {unnest_parameters(END_COLUMNS, "ending")}
    ),
    clock AS MATERIALIZED (SELECT {POSTGRESQL_NOW} AS now),
    held AS MATERIALIZED (
        SELECT media_id FROM jobs
        WHERE media_id = ANY(CAST(:media_id AS text[])) AND status = {PROCESSING_STATUS}
        ORDER BY media_id
        FOR UPDATE
    ),
    ended AS (
        UPDATE jobs SET {ending_assignments("clock.now")}
        FROM held, ends AS ending, clock
        WHERE jobs.media_id = held.media_id
            AND ending.media_id = held.media_id
            AND jobs.status = {PROCESSING_STATUS}
            AND jobs.lease_token = ending.lease_token
        RETURNING jobs.media_id, clock.now
    ),
    finished AS (
        UPDATE job_attempts SET
            ended_at = ended.now,
            outcome = ending.outcome,
            error_reason = ending.attempt_error_reason,
            error_message = ending.attempt_error_message,
            error_transient = ending.attempt_error_transient
        FROM ended, ends AS ending
        WHERE ending.media_id = ended.media_id
            AND job_attempts.media_id = ended.media_id
            AND job_attempts.number = ending.number
            AND job_attempts.outcome = 'RUNNING'
    )
    SELECT media_id, now FROM ended
    """
)


def _postgresql_end_attempts(conn: Connection, ends: Sequence[AttemptEnd]) -> list[float | None]:
    written: list[float | None] = [None] * len(ends)
    # A job ended twice in one group (its holder and a stale worker, say): its second end
    # goes in a later round, and finds what the first one did, as if one by one.
    rounds: list[list[int]] = []
    seen: dict[str, int] = {}
    for index, end in enumerate(ends):
        round_number = seen.get(end.job.spec.media_id, 0)
        seen[end.job.spec.media_id] = round_number + 1
        if round_number == len(rounds):
            rounds.append([])
        rounds[round_number].append(index)
    for indices in rounds:
        group = [ends[index] for index in indices]
        rows = conn.execute(_PG_END, end_parameters(group))
        ended: dict[str, float] = {row.media_id: row.now for row in rows}
        for index, end in zip(indices, group, strict=True):
            written[index] = ended.get(end.job.spec.media_id)
    return written


def end_parameters(ends: Sequence[AttemptEnd]) -> dict[str, list[Any]]:
    rows: list[dict[str, Any]] = []
    for end in ends:
        completed = end.status is JobStatus.COMPLETED
        attempt_error = error_values(end.attempt_error or end.error)
        rows.append(
            {
                "media_id": end.job.spec.media_id,
                "lease_token": end.job.lease_token,
                "status": end.status.value,
                "attempt": end.attempt,
                "delay": end.delay,
                "quota_deferrals": end.quota_deferrals,
                "result_key": end.result_key if completed else None,
                "reused": bool(end.result and end.result.reused),
                **error_values(end.error),
                "number": end.job.attempt,
                "outcome": end.outcome.value,
                **_prefixed("attempt_", attempt_error),
            }
        )
    return array_parameters(END_COLUMNS, rows)


def _processing_statement() -> sa.Select[Any]:
    return (
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


_PROCESSING = _processing_statement()


def _processing_rows(conn: Connection, media_ids: Collection[str]) -> dict[str, Any]:
    """The PROCESSING rows among ``media_ids``, by media id, with what an end may keep."""
    rows = conn.execute(_PROCESSING, {"media_ids": list(media_ids)})
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


def _sqlite_end_attempts(conn: Connection, ends: Sequence[AttemptEnd]) -> list[float | None]:
    """SQLite (one writer): the held rows read, then the changes written in a few statements
    for the whole group."""
    now = read_database_now(conn)
    held = _processing_rows(conn, {end.job.spec.media_id for end in ends})
    written: list[float | None] = []
    job_values: list[dict[str, Any]] = []
    attempt_values: list[dict[str, Any]] = []
    for end in ends:
        media_id = end.job.spec.media_id
        row = held.get(media_id)
        if row is None or row.lease_token != end.job.lease_token:
            written.append(None)
            continue
        # A second end of this job in the group finds it no longer PROCESSING.
        del held[media_id]
        written.append(now)
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
