"""The webhook deliveries table: enqueued with a status change, claimed, recorded, listed,
abandoned (their endpoint gone from the webhooks file), revived.

Plain functions of a synchronous connection, so they run inside whichever transaction calls
them (the status mirror's, for :func:`enqueue`); ``sql_deliveries`` runs the others as the
dispatcher's store.

Claims: a claim pushes ``next_attempt_at`` to the end of its lease and writes the claimer's
id into ``claim``; the outcome is recorded only while ``claim`` still names the claimer, so
an attempt that outlived its lease (and was claimed again elsewhere) changes nothing. A
claimer that stops releases what it still holds: due at once, for anyone. The rows claimed
and not past their lease are the endpoint's attempts in flight, on every replica: a claim
takes no more than the endpoint's concurrency leaves. For that count to hold, the claims of
one endpoint take turns: on PostgreSQL under a transaction's advisory lock keyed by the
endpoint (and ``FOR UPDATE SKIP LOCKED`` passes over rows an outcome is being written to),
on SQLite under the one writer's lock.

Every time written or compared is the database's clock (PostgreSQL's; on SQLite, one
machine's file, this process's): replicas whose clocks disagree would otherwise each judge a
lease by their own, and two would send one delivery at once.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ingest_service.domain.models import ProcessingStatus
from ingest_service.domain.webhook_backlog import DeliveryListing
from ingest_service.domain.webhook_endpoints import WebhookEndpoint
from ingest_service.domain.webhooks import Claim, Delivery, Retry, WebhookChange
from ingest_service.storage.schema import media, webhook_deliveries
from mediatag_common.database import POSTGRESQL, database_now, insert

_table = webhook_deliveries
# The longest error text kept per delivery (a receiver's status line, a socket error).
MAX_ERROR_LENGTH = 200

# PostgreSQL's clock in seconds since the epoch, fixed for the statement.
_PG_NOW = "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"
# An endpoint's turn to claim, then the clock once the turn came. The lock is the
# transaction's, in the two-key space (apart from the migrations' one-key lock); the
# materialised CTE is read, so the lock taken, before the clock is.
_PG_CLAIM_TURN = sa.text(
    """
    WITH turn AS MATERIALIZED (
        SELECT pg_advisory_xact_lock(hashtext('mediatag.webhook_claims'), hashtext(:endpoint))
    )
    SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION) FROM turn
    """
)


def _now(conn: Connection) -> sa.ColumnElement[float]:
    """Now, for a statement that writes it without reading it back."""
    if conn.dialect.name == POSTGRESQL:
        return sa.literal_column(_PG_NOW, sa.Float)
    return sa.literal(time.time(), sa.Float)


def enqueue(
    conn: Connection,
    *,
    media_id: str,
    status: ProcessingStatus,
    revision: int,
    event_time: float,
    endpoints: Sequence[WebhookEndpoint],
) -> list[str]:
    """Insert a delivery of this change for each of ``endpoints`` that wants it, due now;
    their names.

    Called in the transaction that applies the change to the media row. ``created_at`` is
    on the database's clock, where the end of the retry period is judged.
    """
    owner_id = conn.execute(sa.select(media.c.owner_id).where(media.c.id == media_id)).scalar()
    if owner_id is None:
        return []
    change = WebhookChange(media_id, owner_id, status, revision, event_time)
    wanted = [e.name for e in endpoints if e.wants(owner_id, status)]
    if wanted:
        now = _now(conn)
        # A message id already there is an older change's of the same item and revision: of
        # an event log since replaced (see IngestStore.forget_revisions). Receivers drop a
        # repeated webhook-id as a duplicate, so it is not enqueued twice either.
        conn.execute(
            insert(conn, _table)
            .values(created_at=now, next_attempt_at=now)
            .on_conflict_do_nothing(index_elements=["endpoint", "message_id"]),
            [
                {
                    "endpoint": name,
                    "message_id": change.message_id,
                    "media_id": media_id,
                    "owner_id": owner_id,
                    "status": status.value,
                    "revision": revision,
                    "event_time": event_time,
                    "attempts": 0,
                }
                for name in wanted
            ],
        )
    return wanted


def delivery_from_row(row: Any) -> Delivery:
    return Delivery(
        id=row.id,
        endpoint=row.endpoint,
        change=WebhookChange(
            media_id=row.media_id,
            owner_id=row.owner_id,
            status=ProcessingStatus(row.status),
            revision=row.revision,
            event_time=row.event_time,
        ),
        created_at=row.created_at,
        attempts=row.attempts,
        last_error=row.last_error,
        dead_at=row.dead_at,
        next_attempt_at=row.next_attempt_at,
    )


def _live(endpoint: str) -> sa.ColumnElement[bool]:
    return sa.and_(_table.c.endpoint == endpoint, _table.c.dead_at.is_(None))


def claim(
    conn: Connection,
    endpoint: str,
    limit: int,
    *,
    concurrency: int,
    lease: float,
    claimer: str,
) -> Claim:
    """Up to ``limit`` due deliveries of ``endpoint``, oldest due first, now held by
    ``claimer`` for ``lease`` seconds, and no more than leaves ``concurrency`` of the
    endpoint's deliveries held (by any claimer, lease not ended); and in how many seconds
    there may be another to claim."""
    if conn.dialect.name == POSTGRESQL:
        now = float(conn.execute(_PG_CLAIM_TURN, {"endpoint": endpoint}).scalar_one())
    else:
        # The transaction holds the file's write lock since it began: claims take turns.
        now = database_now(conn)
    in_flight, first_lease_end = conn.execute(
        sa.select(sa.func.count(), sa.func.min(_table.c.next_attempt_at)).where(
            _live(endpoint), _table.c.claim.is_not(None), _table.c.next_attempt_at > now
        )
    ).one()
    room = min(limit, concurrency - in_flight)
    rows: Sequence[Any] = []
    if room > 0:
        rows = conn.execute(
            sa.select(_table)
            .where(_live(endpoint), _table.c.next_attempt_at <= now)
            .order_by(_table.c.next_attempt_at, _table.c.id)
            .limit(room)
            .with_for_update(skip_locked=True)
        ).all()
    if rows:
        conn.execute(
            sa.update(_table)
            .where(_table.c.id.in_([row.id for row in rows]))
            .values(claim=claimer, next_attempt_at=now + lease)
        )
    if in_flight + len(rows) >= concurrency:
        # Every slot taken: one frees as an attempt ends (this replica's loop is woken then;
        # another replica's is seen at its next poll), at the latest as the first lease ends.
        ends = [now + lease] if rows else []
        next_due = min([*ends, *([] if first_lease_end is None else [first_lease_end])])
    else:
        next_due = conn.execute(
            sa.select(sa.func.min(_table.c.next_attempt_at)).where(_live(endpoint))
        ).scalar()
    return Claim(
        [delivery_from_row(row) for row in rows], None if next_due is None else next_due - now
    )


def _held(delivery_id: int, claimer: str) -> sa.ColumnElement[bool]:
    return sa.and_(_table.c.id == delivery_id, _table.c.claim == claimer)


def delivered(conn: Connection, delivery_id: int, claimer: str) -> None:
    conn.execute(sa.delete(_table).where(_held(delivery_id, claimer)))


def release(conn: Connection, delivery_ids: Collection[int], claimer: str) -> None:
    """Those of ``delivery_ids`` still held by ``claimer``: held by nobody, due now,
    attempts unchanged (an attempt cut short is no failure)."""
    conn.execute(
        sa.update(_table)
        .where(_table.c.id.in_(list(delivery_ids)), _table.c.claim == claimer)
        .values(claim=None, next_attempt_at=_now(conn))
    )


def failed(conn: Connection, delivery_id: int, claimer: str, *, error: str, retry: Retry) -> bool:
    """One more failed attempt, if ``claimer`` still holds it: due again, or dead as of now,
    as ``retry`` says from now; whether it died."""
    now = database_now(conn)
    retry_at = retry.next_attempt(now)
    result = conn.execute(
        sa.update(_table)
        .where(_held(delivery_id, claimer))
        .values(
            attempts=_table.c.attempts + 1,
            claim=None,
            last_error=error[:MAX_ERROR_LENGTH],
            next_attempt_at=now if retry_at is None else retry_at,
            dead_at=now if retry_at is None else None,
        )
    )
    return retry_at is None and result.rowcount > 0


def abandon(conn: Connection, *, named: Collection[str], error: str) -> int:
    """Deliveries not dead to endpoints other than ``named``: dead as of now, with
    ``error``, held by nobody; how many.

    One statement, so replicas running it at once mark each row once (on PostgreSQL the
    later one waits for the row and finds it dead). The claim is cleared so that an attempt
    still in flight (another replica whose file still names the endpoint) cannot record an
    outcome that would make it due again."""
    now = _now(conn)
    result = conn.execute(
        sa.update(_table)
        .where(_table.c.dead_at.is_(None), _table.c.endpoint.not_in(list(named)))
        .values(dead_at=now, next_attempt_at=now, claim=None, last_error=error[:MAX_ERROR_LENGTH])
    )
    return result.rowcount


def revive(
    conn: Connection,
    delivery_ids: Collection[int] | None,
    *,
    endpoints: Collection[str],
    owners: Collection[str] | None = None,
) -> int:
    """Dead deliveries to ``endpoints`` (those of ``delivery_ids``; None: all), of ``owners``
    (None: every owner), due now with a new retry period; how many."""
    condition = sa.and_(_table.c.dead_at.is_not(None), _table.c.endpoint.in_(list(endpoints)))
    if delivery_ids is not None:
        condition = sa.and_(condition, _table.c.id.in_(list(delivery_ids)))
    if owners is not None:
        condition = sa.and_(condition, _table.c.owner_id.in_(list(owners)))
    now = _now(conn)
    result = conn.execute(
        sa.update(_table)
        .where(condition)
        .values(dead_at=None, attempts=0, created_at=now, next_attempt_at=now, claim=None)
    )
    return result.rowcount


@dataclass(frozen=True)
class DeliveryCounts:
    """Deliveries waiting (or in flight) and dead, for one endpoint."""

    pending: int = 0
    dead: int = 0


def counts(conn: Connection) -> dict[str, DeliveryCounts]:
    """Per endpoint name, its deliveries waiting and dead."""
    dead = _table.c.dead_at.is_not(None)
    rows = conn.execute(
        sa.select(
            _table.c.endpoint,
            sa.func.count().filter(sa.not_(dead)).label("pending"),
            sa.func.count().filter(dead).label("dead"),
        ).group_by(_table.c.endpoint)
    )
    return {row.endpoint: DeliveryCounts(row.pending, row.dead) for row in rows}


def listed(conn: Connection, listing: DeliveryListing, *, limit: int) -> list[Delivery]:
    """Undelivered deliveries ``listing`` selects, newest first, at most ``limit``."""
    query = sa.select(_table)
    if listing.dead is not None:
        dead = _table.c.dead_at.is_not(None)
        query = query.where(dead if listing.dead else sa.not_(dead))
    if listing.endpoint:
        query = query.where(_table.c.endpoint == listing.endpoint)
    if listing.owners is not None:
        query = query.where(_table.c.owner_id.in_(list(listing.owners)))
    if listing.before_id is not None:
        query = query.where(_table.c.id < listing.before_id)
    rows = conn.execute(query.order_by(_table.c.id.desc()).limit(limit))
    return [delivery_from_row(row) for row in rows]


def owners_of(conn: Connection, delivery_ids: Collection[int]) -> dict[int, str]:
    """The owner of each undelivered delivery of ``delivery_ids``; others are left out."""
    rows = conn.execute(
        sa.select(_table.c.id, _table.c.owner_id).where(_table.c.id.in_(list(delivery_ids)))
    )
    return {row.id: row.owner_id for row in rows}
