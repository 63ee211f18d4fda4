"""A grouped turn on PostgreSQL in one statement: the ends of attempts, the claims and their
events, committed by itself (no ``BEGIN`` and ``COMMIT`` round trips).

Written as a transaction of its own statements, a turn costs five round trips (``BEGIN``, the
ends, the claims, the events, ``COMMIT``) and the turns of a busy replica follow each other
one at a time. Here its parts are the data-modifying CTEs of one statement, which is atomic:

- the rows of the ends still held by their tokens are locked (in media id order, so two
  turns ending overlapping groups cannot deadlock) and the due jobs picked (``FOR UPDATE SKIP
  LOCKED``, in queue order, by the function ``claimable_jobs`` of migration 5, which says
  why): how many changes the turn makes is known before the counter. The function reads
  with a snapshot of its own (``FOR UPDATE`` needs a volatile function), newer than the
  statement's when the statement waited for a row: a job submitted meanwhile is one it may
  pick but the statement's writes cannot see, so the jobs picked are only those the
  statement sees (else the counter would count a claim never written: a gap);
- then the revision counter row is bumped by that many (its lock, held to commit, orders
  the commits by revision, with no gap: see :mod:`.events`), and the time is read under it;
- then the jobs are written with their revisions (each row once in the statement), their
  attempts ended or started, the events appended, the counts adjusted, and one ``NOTIFY``.

A group it cannot take (a job ended twice, claims for two holders) goes the transaction's
way (:func:`analysis_service.storage.queue_store.SqlQueueStore`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.domain.models import JobStatus
from analysis_service.domain.store import AttemptEnd
from analysis_service.storage import schema
from analysis_service.storage.attempt_ends import (
    END_COLUMNS,
    PROCESSING_STATUS,
    end_parameters,
    ending_assignments,
)
from analysis_service.storage.clock import POSTGRESQL_NOW
from analysis_service.storage.events import NOTIFY_CHANNEL
from mediatag_common.database import unnest_parameters

_PENDING = f"'{JobStatus.PENDING.value}'"
_COUNT = f"'{schema.job_count(JobStatus.PENDING).removesuffix(JobStatus.PENDING.value)}'"
# What a claimed job's row gives back (its spec and lease), beside each change's revision.
_CLAIMED_COLUMNS = (
    "owner_id",
    "category",
    "context",
    "sha256",
    "size_bytes",
    "content_type",
    "content_ref",
    "priority",
    "attempt",
    "lease_token",
    "quota_deferrals",
)

_TURN = sa.text(
    f"""
    WITH ending AS MATERIALIZED (
        SELECT * FROM {unnest_parameters(END_COLUMNS, "ending")}
    ),
    clock AS MATERIALIZED (SELECT {POSTGRESQL_NOW} AS now),
    held AS MATERIALIZED (
        SELECT jobs.media_id, ending.position
        FROM jobs JOIN ending ON ending.media_id = jobs.media_id
        WHERE jobs.status = {PROCESSING_STATUS} AND jobs.lease_token = ending.lease_token
        ORDER BY jobs.media_id
        FOR UPDATE OF jobs
    ),
    picked AS MATERIALIZED (
        SELECT * FROM claimable_jobs(:claim_count, (SELECT now FROM clock)) AS due
        WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.media_id = due.media_id)
    ),
    numbered AS MATERIALIZED (
        SELECT media_id, row_number() OVER (ORDER BY kind, rank) AS number
        FROM (
            SELECT media_id, 0 AS kind, position AS rank FROM held
            UNION ALL
            SELECT media_id, 1, row_number() OVER (
                ORDER BY priority DESC, submitted_at, media_id
            ) FROM picked
        ) AS changes
    ),
    bump AS (
        UPDATE counters SET value = value + (SELECT count(*) FROM numbered)
        WHERE name = '{schema.REVISION}' AND EXISTS (SELECT 1 FROM numbered)
        RETURNING value - (SELECT count(*) FROM numbered) AS base, {POSTGRESQL_NOW} AS now,
            pg_notify('{NOTIFY_CHANNEL}', CAST(value AS text)) AS notified
    ),
    ended AS (
        UPDATE jobs SET {ending_assignments("bump.now")},
            revision = bump.base + numbered.number
        FROM held, ending, numbered, bump
        WHERE jobs.media_id = held.media_id
            AND ending.position = held.position
            AND numbered.media_id = held.media_id
        RETURNING jobs.media_id, jobs.owner_id, jobs.status, jobs.attempt, jobs.revision,
            jobs.updated_at, ending.result_key, ending.reused, ending.error_reason,
            ending.error_message, ending.error_transient,
            bump.now + ending.delay AS next_attempt_at, ending.number, ending.outcome,
            ending.attempt_error_reason, ending.attempt_error_message,
            ending.attempt_error_transient
    ),
    finished AS (
        UPDATE job_attempts SET
            ended_at = ended.updated_at,
            outcome = ended.outcome,
            error_reason = ended.attempt_error_reason,
            error_message = ended.attempt_error_message,
            error_transient = ended.attempt_error_transient
        FROM ended
        WHERE job_attempts.media_id = ended.media_id
            AND job_attempts.number = ended.number
            AND job_attempts.outcome = 'RUNNING'
    ),
    claimed AS (
        UPDATE jobs SET
            status = {PROCESSING_STATUS},
            attempt = jobs.attempt + 1,
            lease_token = jobs.lease_token + 1,
            lease_owner = :claim_holder,
            lease_expires_at = bump.now + :claim_lease_seconds,
            updated_at = bump.now,
            revision = bump.base + numbered.number
        FROM picked, numbered, bump
        WHERE jobs.media_id = picked.media_id AND numbered.media_id = picked.media_id
        RETURNING jobs.*
    ),
    started AS (
        INSERT INTO job_attempts (media_id, number, started_at, outcome)
        SELECT media_id, attempt, updated_at, 'RUNNING' FROM claimed
    ),
    appended AS (
        INSERT INTO events (revision, event_time, media_id, owner_id, status, previous_status,
            attempt, result_key, reused, error_reason, error_message, error_transient,
            next_attempt_at)
        SELECT revision, updated_at, media_id, owner_id, status, {PROCESSING_STATUS}, attempt,
            result_key, reused, error_reason, error_message, error_transient, next_attempt_at
        FROM ended
        UNION ALL
        SELECT revision, updated_at, media_id, owner_id, status, {_PENDING}, attempt,
            NULL, FALSE, NULL, NULL, NULL, NULL
        FROM claimed
    ),
    counted AS (
        UPDATE counters SET value = counters.value + change.delta
        FROM (
            SELECT name, sum(delta) AS delta FROM (
                SELECT {_COUNT} || status AS name, 1 AS delta FROM ended
                UNION ALL SELECT {_COUNT} || {PROCESSING_STATUS}, -1 FROM ended
                UNION ALL SELECT {_COUNT} || {PROCESSING_STATUS}, 1 FROM claimed
                UNION ALL SELECT {_COUNT} || {_PENDING}, -1 FROM claimed
            ) AS deltas
            GROUP BY name
        ) AS change
        WHERE counters.name = change.name AND change.delta <> 0
    )
    SELECT TRUE AS claim, media_id, revision, updated_at,
        {", ".join(_CLAIMED_COLUMNS)}
    FROM claimed
    UNION ALL
    SELECT FALSE, media_id, revision, updated_at,
        {", ".join("NULL" for _ in _CLAIMED_COLUMNS)}
    FROM ended
    ORDER BY revision
    """
)


@dataclass(frozen=True)
class TurnRows:
    """What a turn wrote: the claimed jobs' rows in queue order; for each end, the
    revision and time it was written with, or None (fenced out)."""

    claimed: list[Any]
    ended: list[tuple[int, float] | None]


def can_take(ends: Sequence[AttemptEnd]) -> bool:
    """Whether one statement can write ``ends`` (each job at most once)."""
    return len({end.job.spec.media_id for end in ends}) == len(ends)


def take_turn(
    conn: Connection,
    ends: Sequence[AttemptEnd],
    *,
    claim_count: int,
    holder: str,
    lease_seconds: float,
) -> TurnRows:
    """Write ``ends`` and claim up to ``claim_count`` due jobs for ``holder``, with their
    events, in one statement (``conn`` commits each statement by itself)."""
    parameters: dict[str, Any] = end_parameters(ends)
    parameters.update(
        claim_count=claim_count, claim_holder=holder, claim_lease_seconds=lease_seconds
    )
    claimed: list[Any] = []
    written: dict[str, tuple[int, float]] = {}
    for row in conn.execute(_TURN, parameters):
        if row.claim:
            claimed.append(row)
        else:
            written[row.media_id] = (int(row.revision), float(row.updated_at))
    return TurnRows(claimed, [written.get(end.job.spec.media_id) for end in ends])
