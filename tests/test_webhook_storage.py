"""The webhook deliveries table on SQLite and PostgreSQL: what is enqueued (once, however
many replicas apply the change), exclusive claims with a lease, outcomes recorded only by the
claim's holder, dead deliveries and their revival."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ingest_service.domain.models import ProcessingStatus, StatusUpdate
from ingest_service.domain.store import MirroredChange
from ingest_service.domain.webhook_backlog import DeliveryListing
from ingest_service.domain.webhook_endpoints import TERMINAL_STATUSES, WebhookEndpoint
from ingest_service.storage import webhook_deliveries as store
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK, media
from ingest_service.storage.sql_store import SqlIngestStore
from mediatag_common.database import Database
from tests.conftest import DatabaseUrls

SECRET = "whsec_" + "A" * 32
COMPLETED = ProcessingStatus.COMPLETED


def endpoint(name: str, owners: frozenset[str] | None = None) -> WebhookEndpoint:
    return WebhookEndpoint(name, f"http://127.0.0.1/{name}", SECRET, owners, TERMINAL_STATUSES)


def insert_media(conn: Connection, media_id: str, owner_id: str) -> None:
    conn.execute(
        media.insert().values(
            id=media_id,
            owner_id=owner_id,
            category="Hair",
            context={},
            filename="a.jpg",
            content_type="image/jpeg",
            kind="IMAGE",
            size_bytes=1,
            sha256="0" * 64,
            width=1,
            height=1,
            priority=0,
            status="PENDING",
            not_applicable_reason="",
            attempt=0,
            embedding_dimensions=0,
            analyzer_name="",
            analyzer_version="",
            reused=False,
            status_revision=0,
            created_at=0.0,
            updated_at=0.0,
        )
    )


@pytest.fixture
async def db(databases: DatabaseUrls) -> AsyncIterator[Database]:
    database = Database(databases.new("ingest"))
    await database.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    await database.write(partial(insert_media, media_id="m1", owner_id="listing-7"))
    await database.write(partial(insert_media, media_id="m2", owner_id="listing-8"))
    yield database
    await database.close()


def enqueue(
    media_id: str, revision: int, endpoints: list[WebhookEndpoint], now: float = 100.0
) -> partial[list[str]]:
    return partial(
        store.enqueue,
        media_id=media_id,
        status=COMPLETED,
        revision=revision,
        event_time=now,
        endpoints=endpoints,
        now=now,
    )


async def test_a_change_is_enqueued_for_each_endpoint_that_wants_it(db: Database) -> None:
    endpoints = [endpoint("all"), endpoint("seven", frozenset({"listing-7"}))]
    assert await db.write(enqueue("m1", 5, endpoints)) == ["all", "seven"]
    assert await db.write(enqueue("m2", 6, endpoints)) == ["all"]
    assert await db.write(enqueue("unknown-media", 7, endpoints)) == []

    claim = await db.write(
        partial(store.claim, endpoint="seven", limit=10, now=100.0, lease=30.0, claimer="a")
    )
    [delivery] = claim.deliveries
    assert delivery.change.owner_id == "listing-7"
    assert delivery.change.revision == 5
    assert delivery.change.message_id == "msg_m1_5"
    assert delivery.attempts == 0


async def test_claims_are_exclusive_until_the_lease_ends(db: Database) -> None:
    for revision in range(1, 5):
        await db.write(enqueue("m1", revision, [endpoint("e")]))
    claim_a = partial(store.claim, endpoint="e", lease=30.0, claimer="a")
    claim_b = partial(store.claim, endpoint="e", lease=30.0, claimer="b")

    first = await db.write(partial(claim_a, limit=3, now=100.0))
    second = await db.write(partial(claim_b, limit=3, now=100.0))
    assert [d.change.revision for d in first.deliveries] == [1, 2, 3]
    assert [d.change.revision for d in second.deliveries] == [4]
    assert second.next_due == 130.0

    # Both leases ended: b takes every delivery again, and a's late outcomes change nothing.
    taken = await db.write(partial(claim_b, limit=10, now=131.0))
    assert [d.change.revision for d in taken.deliveries] == [1, 2, 3, 4]
    await db.write(partial(store.delivered, delivery_id=first.deliveries[0].id, claimer="a"))
    await db.write(
        partial(
            store.failed,
            delivery_id=first.deliveries[1].id,
            claimer="a",
            error="HTTP 500",
            retry_at=None,
            now=132.0,
        )
    )
    counts = await db.read(store.counts)
    assert counts == {"e": store.DeliveryCounts(pending=4, dead=0)}

    await db.write(partial(store.delivered, delivery_id=first.deliveries[0].id, claimer="b"))
    assert (await db.read(store.counts))["e"].pending == 3


async def test_released_deliveries_are_due_at_once_for_any_claimer(db: Database) -> None:
    """What a stopping claimer gives back: only what it still holds, not counted as an
    attempt, due at once instead of at the end of its lease."""
    for revision in range(1, 4):
        await db.write(enqueue("m1", revision, [endpoint("e")]))
    claim_a = partial(store.claim, endpoint="e", lease=30.0, claimer="a")
    claim_b = partial(store.claim, endpoint="e", limit=10, lease=30.0, claimer="b")
    held = (await db.write(partial(claim_a, limit=3, now=100.0))).deliveries
    ids = [delivery.id for delivery in held]

    # Another claimer cannot release a's claims.
    await db.write(partial(store.release, delivery_ids=ids, claimer="b", now=101.0))
    assert (await db.write(partial(claim_b, now=101.0))).deliveries == []

    # a recorded the outcome of the first before it stopped; its release changes nothing.
    await db.write(partial(store.delivered, delivery_id=ids[0], claimer="a"))
    await db.write(partial(store.release, delivery_ids=ids[:2], claimer="a", now=102.0))
    taken = await db.write(partial(claim_b, now=102.0))
    assert [d.change.revision for d in taken.deliveries] == [2]
    assert taken.deliveries[0].attempts == 0
    # The third is still a's until its lease ends.
    assert taken.next_due == 130.0


async def test_a_failed_delivery_waits_then_dies_and_can_be_revived(db: Database) -> None:
    await db.write(enqueue("m1", 1, [endpoint("e")]))
    claim = partial(store.claim, endpoint="e", limit=10, lease=30.0, claimer="a")
    [delivery] = (await db.write(partial(claim, now=100.0))).deliveries
    await db.write(
        partial(
            store.failed,
            delivery_id=delivery.id,
            claimer="a",
            error="HTTP 503 " + "x" * 500,
            retry_at=160.0,
            now=101.0,
        )
    )
    assert (await db.write(partial(claim, now=159.0))).deliveries == []
    [again] = (await db.write(partial(claim, now=160.0))).deliveries
    assert again.attempts == 1
    assert again.last_error is not None
    assert len(again.last_error) == store.MAX_ERROR_LENGTH

    await db.write(
        partial(
            store.failed,
            delivery_id=again.id,
            claimer="a",
            error="timeout",
            retry_at=None,
            now=170.0,
        )
    )
    assert (await db.write(partial(claim, now=10_000.0))).deliveries == []
    [dead] = await db.read(partial(store.listed, listing=DeliveryListing(dead=True), limit=10))
    assert (dead.attempts, dead.last_error, dead.dead_at) == (2, "timeout", 170.0)
    assert await db.read(partial(store.listed, listing=DeliveryListing(dead=False), limit=10)) == []
    eights = DeliveryListing(owners={"listing-8"})
    assert await db.read(partial(store.listed, listing=eights, limit=10)) == []
    assert await db.read(store.counts) == {"e": store.DeliveryCounts(pending=0, dead=1)}

    revive = partial(store.revive, delivery_ids=None, now=200.0)
    # Only to the endpoints named, and of the owners named.
    assert await db.write(partial(revive, endpoints=["other"])) == 0
    assert await db.write(partial(revive, endpoints=["e"], owners=["listing-8"])) == 0
    assert await db.write(partial(revive, endpoints=["e"], owners=["listing-7"])) == 1
    [revived] = (await db.write(partial(claim, now=200.0))).deliveries
    assert (revived.attempts, revived.created_at, revived.dead_at) == (0, 200.0, None)
    await db.write(partial(store.delivered, delivery_id=revived.id, claimer="a"))
    rows = await db.read(
        lambda conn: conn.execute(sa.text("SELECT count(*) FROM webhook_deliveries")).scalar()
    )
    assert rows == 0


async def test_a_change_two_replicas_apply_is_enqueued_once(db: Database) -> None:
    other = Database(db.url)
    try:
        change = StatusUpdate(
            revision=9, media_id="m1", status=COMPLETED, attempt=1, event_time=100.0
        )
        hooks = [endpoint("e"), endpoint("eight", frozenset({"listing-8"}))]
        applied = [
            await SqlIngestStore(database).apply_status_changes(
                [MirroredChange(change, hooks)], revision=9
            )
            for database in (db, other)
        ]
        assert applied == [[True], [False]]
        assert await db.read(store.counts) == {"e": store.DeliveryCounts(pending=1, dead=0)}
    finally:
        await other.close()
