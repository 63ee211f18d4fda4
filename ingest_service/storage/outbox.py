"""The outbox's queries: jobs for the analysis service, enqueued with their media and leased
to one forwarder at a time (several ingest processes may share the database).

Plain functions of a synchronous connection, run inside the transactions of
:mod:`ingest_service.storage.sql_store`. Claiming differs between the databases: on
PostgreSQL one statement with ``SKIP LOCKED`` and the database's clock, on SQLite (one writer
at a time) a plain update.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ingest_service.domain.store import OutboxJob
from ingest_service.storage.repository import is_postgresql, media_columns, media_from_row
from ingest_service.storage.schema import media, outbox

# PostgreSQL's clock, in seconds since the epoch, fixed for the statement: outbox leases of
# every process are judged by it, so the processes' own clocks do not matter.
_PG_NOW = "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"
# Lease outbox rows on PostgreSQL: one statement, claimers skipping each other's locked rows.
_PG_CLAIM = sa.text(
    f"""
    WITH claimable AS MATERIALIZED (
        SELECT id FROM outbox
        WHERE claimed_until <= {_PG_NOW}
        ORDER BY id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox SET claimed_until = {_PG_NOW} + :lease, claim_token = :token
    FROM claimable
    WHERE outbox.id = claimable.id
    RETURNING outbox.id
    """
)


def insert_outbox(conn: Connection, media_ids: Sequence[str], *, now: float) -> None:
    if media_ids:
        conn.execute(
            outbox.insert(), [{"media_id": media_id, "created_at": now} for media_id in media_ids]
        )


def claim_outbox(conn: Connection, *, limit: int, lease: float, token: str) -> list[OutboxJob]:
    """Lease the oldest unleased jobs (or those whose lease ended) to ``token``."""
    if is_postgresql(conn):
        claimed = conn.execute(_PG_CLAIM, {"limit": limit, "lease": lease, "token": token})
    else:
        # One writer at a time: the statement reads and leases with nobody in between.
        now = time.time()
        claimable = (
            sa.select(outbox.c.id)
            .where(outbox.c.claimed_until <= now)
            .order_by(outbox.c.id)
            .limit(limit)
        )
        claimed = conn.execute(
            sa.update(outbox)
            .where(outbox.c.id.in_(claimable.scalar_subquery()))
            .values(claimed_until=now + lease, claim_token=token)
            .returning(outbox.c.id)
        )
    outbox_ids = list(claimed.scalars())
    if not outbox_ids:
        return []
    query = (
        sa.select(outbox.c.id.label("outbox_id"), *media_columns(with_embedding=False))
        .join(media, media.c.id == outbox.c.media_id)
        .where(outbox.c.id.in_(outbox_ids))
        .order_by(outbox.c.id)
    )
    return [OutboxJob(row.outbox_id, media_from_row(row)) for row in conn.execute(query)]


def release_outbox(conn: Connection, outbox_ids: Collection[int], *, token: str) -> None:
    """End the leases ``token`` still holds on ``outbox_ids``."""
    conn.execute(
        sa.update(outbox)
        .where(outbox.c.id.in_(list(outbox_ids)), outbox.c.claim_token == token)
        .values(claimed_until=0.0, claim_token=None)
    )


def delete_outbox(conn: Connection, outbox_ids: Collection[int]) -> None:
    conn.execute(sa.delete(outbox).where(outbox.c.id.in_(list(outbox_ids))))


def outbox_size(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one())
