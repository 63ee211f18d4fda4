"""Tables of the analysis service, as its queries see them, and its versioned migrations."""

from __future__ import annotations

import sqlalchemy as sa

from analysis_service.domain.models import JobStatus
from mediatag_common.migrations import load_migrations

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("media_id", sa.String, primary_key=True),
    sa.Column("owner_id", sa.String, nullable=False),
    sa.Column("category", sa.String, nullable=False),
    sa.Column("context", sa.JSON, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("content_type", sa.String, nullable=False),
    sa.Column("content_ref", sa.String, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("quota_deferrals", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("lease_owner", sa.String),
    sa.Column("lease_expires_at", sa.Float),
    # Incremented on every claim; a worker whose token is stale cannot complete the job.
    sa.Column("lease_token", sa.Integer, nullable=False),
    sa.Column("result_key", sa.String(64)),
    sa.Column("reused", sa.Boolean, nullable=False),
    sa.Column("error_reason", sa.String),
    sa.Column("error_message", sa.String),
    sa.Column("error_transient", sa.Boolean),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Index("jobs_claim_order", "status", sa.text("priority DESC"), "submitted_at", "media_id"),
    sa.Index("jobs_owner", "owner_id", "status"),
    sa.Index("jobs_lease_expiry", "status", "lease_expires_at"),
    sa.Index("jobs_pending_age", "status", "submitted_at"),
)

attempts = sa.Table(
    "job_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("media_id", sa.String, sa.ForeignKey("jobs.media_id"), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("error_reason", sa.String),
    sa.Column("error_message", sa.String),
    sa.Column("error_transient", sa.Boolean),
    sa.Index("job_attempts_media", "media_id", "id"),
)

# Results by cache key: (sha256, analyser name+version, every input that changes the result).
results = sa.Table(
    "results",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("analyzer_name", sa.String, nullable=False),
    sa.Column("analyzer_version", sa.String, nullable=False),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("embedding", sa.LargeBinary, nullable=False),
    sa.Column("embedding_dimensions", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# Which process is analysing a cache key right now: identical content on several replicas
# is analysed once (the others wait for the result while the claim is live).
result_claims = sa.Table(
    "result_claims",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

# The event log: one row per status transition; revision is the watch cursor.
events = sa.Table(
    "events",
    metadata,
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("media_id", sa.String, nullable=False),
    sa.Column("owner_id", sa.String, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("previous_status", sa.String(16)),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("event_time", sa.Float, nullable=False),
    sa.Column("result_key", sa.String(64)),
    sa.Column("reused", sa.Boolean, nullable=False),
    sa.Column("error_reason", sa.String),
    sa.Column("error_message", sa.String),
    sa.Column("error_transient", sa.Boolean),
    sa.Column("next_attempt_at", sa.Float),
    sa.Index("events_media", "media_id", "revision"),
    sa.Index("events_time", "event_time"),
)

# Named integers: the revision counter, the compaction watermark, the paused flag, and the
# number of jobs in each status (kept with every transition: GetQueueStatus counts nothing).
counters = sa.Table(
    "counters",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

# One row per upstream API, shared by every replica (used on PostgreSQL; see rate_limits.py):
# the GCRA state (the theoretical arrival time of the next call, epoch seconds on the
# database's clock), the quota pause, and calls counted in two consecutive windows for the
# status's "in use".
rate_limits = sa.Table(
    "rate_limits",
    metadata,
    sa.Column("api", sa.String, primary_key=True),
    sa.Column("theoretical_arrival", sa.Float, nullable=False),
    sa.Column("paused_until", sa.Float, nullable=False),
    sa.Column("quota_errors", sa.BigInteger, nullable=False),
    sa.Column("window_start", sa.Float, nullable=False),
    sa.Column("window_calls", sa.BigInteger, nullable=False),
    sa.Column("previous_window_calls", sa.BigInteger, nullable=False),
)

# Each analysis replica's heartbeat (times on the database's clock).
replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("replica_id", sa.String, primary_key=True),
    sa.Column("host", sa.String, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("workers_total", sa.Integer, nullable=False),
    sa.Column("workers_busy", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("finished_last_minute", sa.Integer, nullable=False, server_default="0"),
    sa.Column("busy_seconds_last_minute", sa.Float, nullable=False, server_default="0"),
)

REVISION = "revision"
COMPACTED_THROUGH = "compacted_through"
PAUSED = "paused"


def job_count(status: JobStatus) -> str:
    """The counter holding the number of jobs in ``status``."""
    return f"jobs:{status.value}"


# Versioned SQL files per database (see mediatag_common.migrations), never derived from the
# table definitions above: those are what the queries use, and a test checks they agree.
MIGRATIONS = load_migrations("analysis_service.storage.migrations")
MIGRATIONS_LOCK = "mediatag-analysis"
