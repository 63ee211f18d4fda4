"""Tables of the ingest service, as its queries see them, and its versioned migrations."""

from __future__ import annotations

import sqlalchemy as sa

from mediatag_common.migrations import load_migrations

metadata = sa.MetaData()

media = sa.Table(
    "media",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner_id", sa.String, nullable=False),
    sa.Column("category", sa.String, nullable=False),
    sa.Column("context", sa.JSON, nullable=False),
    sa.Column("filename", sa.String, nullable=False),
    sa.Column("content_type", sa.String, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("not_applicable_reason", sa.String, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    # The analysis result, mirrored from the analysis service when COMPLETED.
    sa.Column("tags", sa.JSON),
    # float32 values, native byte order.
    sa.Column("embedding", sa.LargeBinary),
    sa.Column("embedding_dimensions", sa.Integer, nullable=False),
    sa.Column("analyzer_name", sa.String, nullable=False),
    sa.Column("analyzer_version", sa.String, nullable=False),
    sa.Column("reused", sa.Boolean, nullable=False),
    sa.Column("error_reason", sa.String),
    sa.Column("error_message", sa.String),
    sa.Column("error_attempt", sa.Integer),
    # Revision of the analysis status event last applied; older events are ignored.
    sa.Column("status_revision", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # ListMedia: newest first per owner or of every owner, optionally per status.
    sa.Index("media_owner_time", "owner_id", "created_at", "id"),
    sa.Index("media_owner_status_time", "owner_id", "status", "created_at", "id"),
    sa.Index("media_time", "created_at", "id"),
    sa.Index("media_status_time", "status", "created_at", "id"),
    # The blob sweep: which blobs some row names.
    sa.Index("media_sha256", "sha256"),
)

# Jobs committed with their media rows and not yet accepted by the analysis service.
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("media_id", sa.String(36), sa.ForeignKey("media.id"), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    # The lease of the forwarder delivering the row: until this time (seconds since the
    # epoch, on the database's clock) no other forwarder is handed it.
    sa.Column("claimed_until", sa.Float, nullable=False, server_default="0"),
    # Who holds the lease (a token per claim); NULL when nobody does.
    sa.Column("claim_token", sa.String(36)),
)

# Named integers; the status mirror's last applied revision.
counters = sa.Table(
    "counters",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

MIRROR_REVISION = "mirror_revision"

# Uploads that carried a request_id (AIP-155), kept for the retention period: a retry with the
# same id is answered from here. The primary key is what makes a duplicate store nothing twice
# even when two processes race; within one process the uploads serialise per id before this.
upload_requests = sa.Table(
    "upload_requests",
    metadata,
    sa.Column("request_id", sa.String(36), primary_key=True),
    # SHA-256 of the request's content and metadata: the same id with other content is refused.
    sa.Column("digest", sa.String(64), nullable=False),
    # The media the first answer listed, in its order.
    sa.Column("media_ids", sa.JSON, nullable=False),
    sa.Column("message", sa.String, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("upload_requests_created_at", "created_at"),
)


# Webhook deliveries: one row per terminal status change and matching endpoint, inserted in
# the transaction that applies the change, deleted once the endpoint accepted it. A claim
# moves ``next_attempt_at`` past the lease and names its claimer in ``claim``; only that
# claimer records the outcome. A row past its retry period is kept with ``dead_at`` set.
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    # The endpoint's name in the webhooks file.
    sa.Column("endpoint", sa.String, nullable=False),
    # The ``webhook-id`` header: the same on every attempt.
    sa.Column("message_id", sa.String, nullable=False),
    sa.Column("media_id", sa.String(36), nullable=False),
    sa.Column("owner_id", sa.String, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("event_time", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # Attempts that failed so far.
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("claim", sa.String),
    sa.Column("last_error", sa.String),
    sa.Column("dead_at", sa.Float),
    sa.UniqueConstraint("endpoint", "message_id"),
    # Each endpoint's claims: its live rows, soonest due first.
    sa.Index("webhook_deliveries_due", "endpoint", "dead_at", "next_attempt_at"),
    # The dead ones, newest first (the dashboard's panel), however many are still retried.
    sa.Index(
        "webhook_deliveries_dead",
        "id",
        sqlite_where=sa.text("dead_at IS NOT NULL"),
        postgresql_where=sa.text("dead_at IS NOT NULL"),
    ),
    # The claimed ones: each claim counts its endpoint's in flight without scanning the rest.
    sa.Index(
        "webhook_deliveries_claimed",
        "endpoint",
        "next_attempt_at",
        sqlite_where=sa.text("claim IS NOT NULL"),
        postgresql_where=sa.text("claim IS NOT NULL"),
    ),
)


# Versioned SQL files per database (see mediatag_common.migrations), never derived from the
# table definitions above: those are what the queries use, and a test checks they agree.
MIGRATIONS = load_migrations("ingest_service.storage.migrations")
MIGRATIONS_LOCK = "mediatag-ingest"
