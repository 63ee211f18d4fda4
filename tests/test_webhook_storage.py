"""The webhook deliveries table on SQLite and PostgreSQL: what is enqueued (once, however
many replicas apply the change), exclusive claims with a lease, outcomes recorded only by the
claim's holder, dead deliveries and their revival, deliveries of endpoints no longer named
made dead (once, however many replicas mark them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ingest_service.domain.models import ProcessingStatus, StatusUpdate
from ingest_service.domain.store import MirroredChange
from ingest_service.domain.webhook_backlog import DeliveryListing
from ingest_service.domain.webhook_endpoints import TERMINAL_STATUSES, WebhookEndpoint
from ingest_service.domain.webhooks import Claim, Retry
from ingest_service.storage import webhook_deliveries as store
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK, media
from ingest_service.storage.sql_store import SqlIngestStore
from mediatag_common.database import Database, database_now
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


def enqueue(media_id: str, revision: int, endpoints: list[WebhookEndpoint]) -> partial[list[str]]:
    return partial(
        store.enqueue,
        media_id=media_id,
        status=COMPLETED,
        revision=revision,
        event_time=100.0,
        endpoints=endpoints,
    )


def claim_of(
    claimer: str,
    *,
    endpoint: str = "e",
    limit: int = 10,
    concurrency: int = 10,
    lease: float = 30.0,
) -> partial[Claim]:
    return partial(
        store.claim,
        endpoint=endpoint,
        limit=limit,
        concurrency=concurrency,
        lease=lease,
        claimer=claimer,
    )


def revisions(claim: Claim) -> list[int]:
    return [delivery.change.revision for delivery in claim.deliveries]


async def test_a_change_is_enqueued_for_each_endpoint_that_wants_it(db: Database) -> None:
    endpoints = [endpoint("all"), endpoint("seven", frozenset({"listing-7"}))]
    before = await db.read(database_now)
    assert await db.write(enqueue("m1", 5, endpoints)) == ["all", "seven"]
    after = await db.read(database_now)
    assert await db.write(enqueue("m2", 6, endpoints)) == ["all"]
    assert await db.write(enqueue("unknown-media", 7, endpoints)) == []

    claim = await db.write(claim_of("a", endpoint="seven"))
    [delivery] = claim.deliveries
    assert delivery.change.owner_id == "listing-7"
    assert delivery.change.revision == 5
    assert delivery.change.message_id == "msg_m1_5"
    assert delivery.attempts == 0
    # On the database's clock, where its retry period ends.
    assert before <= delivery.created_at <= after


async def test_claims_are_exclusive_until_the_lease_ends(db: Database) -> None:
    for revision in range(1, 5):
        await db.write(enqueue("m1", revision, [endpoint("e")]))

    # Leases that end as they begin: the claims are anyone's at once.
    first = await db.write(claim_of("a", limit=3, lease=0.0))
    assert revisions(first) == [1, 2, 3]
    taken = await db.write(claim_of("b"))
    assert sorted(revisions(taken)) == [1, 2, 3, 4]
    # b's hold until its lease ends, on the database's clock.
    nothing = await db.write(claim_of("c"))
    assert nothing.deliveries == []
    assert nothing.next_due_in is not None
    assert 29.0 < nothing.next_due_in <= 30.0

    # a's late outcomes change nothing.
    await db.write(partial(store.delivered, delivery_id=first.deliveries[0].id, claimer="a"))
    late = partial(store.failed, claimer="a", error="HTTP 500", retry=Retry(0.0, 0.0))
    assert await db.write(partial(late, delivery_id=first.deliveries[1].id)) is False
    counts = await db.read(store.counts)
    assert counts == {"e": store.DeliveryCounts(pending=4, dead=0)}

    await db.write(partial(store.delivered, delivery_id=first.deliveries[0].id, claimer="b"))
    assert (await db.read(store.counts))["e"].pending == 3


async def test_an_endpoint_has_at_most_its_concurrency_claimed_by_all_claimers(
    db: Database,
) -> None:
    """The claims not past their lease, whoever holds them, are the endpoint's attempts in
    flight: a claim takes only the slots they leave, and each one that ends (accepted,
    failed, given back, or its lease over) frees one."""
    for revision in range(1, 6):
        await db.write(enqueue("m1", revision, [endpoint("e")]))
    await db.write(enqueue("m1", 1, [endpoint("other")]))
    three = partial(claim_of, concurrency=3)

    held = (await db.write(three("a"))).deliveries
    assert [d.change.revision for d in held] == [1, 2, 3]
    full = await db.write(three("b"))
    assert full.deliveries == []
    # Every slot taken: there may be one again when the first lease ends, at the latest.
    assert full.next_due_in is not None
    assert 29.0 < full.next_due_in <= 30.0
    # Another endpoint's slots are its own.
    assert revisions(await db.write(three("b", endpoint="other"))) == [1]

    await db.write(partial(store.delivered, delivery_id=held[0].id, claimer="a"))
    assert revisions(await db.write(three("b"))) == [4]
    assert (await db.write(three("b"))).deliveries == []
    retry_later = Retry(delay=3600.0, deadline=float("inf"))
    failed = partial(store.failed, error="HTTP 500", retry=retry_later)
    assert await db.write(partial(failed, delivery_id=held[1].id, claimer="a")) is False
    await db.write(partial(store.release, delivery_ids=[held[2].id], claimer="a"))
    # Two slots again: the oldest due first (5, then 3 given back after it was enqueued).
    assert revisions(await db.write(three("b"))) == [5, 3]

    # A claim whose lease is over holds no slot.
    await db.write(enqueue("m2", 10, [endpoint("x")]))
    ended = await db.write(claim_of("a", endpoint="x", concurrency=1, lease=0.0))
    assert revisions(ended) == [10]
    assert revisions(await db.write(claim_of("b", endpoint="x", concurrency=1))) == [10]


async def test_released_deliveries_are_due_at_once_for_any_claimer(db: Database) -> None:
    """What a stopping claimer gives back: only what it still holds, not counted as an
    attempt, due at once instead of at the end of its lease."""
    for revision in range(1, 4):
        await db.write(enqueue("m1", revision, [endpoint("e")]))
    held = (await db.write(claim_of("a", limit=3))).deliveries
    ids = [delivery.id for delivery in held]

    # Another claimer cannot release a's claims.
    await db.write(partial(store.release, delivery_ids=ids, claimer="b"))
    assert (await db.write(claim_of("b"))).deliveries == []

    # a recorded the outcome of the first before it stopped; its release changes nothing.
    await db.write(partial(store.delivered, delivery_id=ids[0], claimer="a"))
    await db.write(partial(store.release, delivery_ids=ids[:2], claimer="a"))
    taken = await db.write(claim_of("b"))
    assert revisions(taken) == [2]
    assert taken.deliveries[0].attempts == 0
    # The third is still a's until its lease ends.
    assert taken.next_due_in is not None
    assert 29.0 < taken.next_due_in <= 30.0


async def test_a_failed_delivery_waits_then_dies_and_can_be_revived(db: Database) -> None:
    """Retries and the end of the retry period on the database's clock."""
    await db.write(enqueue("m1", 1, [endpoint("e")]))
    claim = claim_of("a")
    [delivery] = (await db.write(claim)).deliveries
    failed = partial(store.failed, claimer="a")
    at_once = Retry(delay=0.0, deadline=delivery.created_at + 3600.0)
    died = await db.write(
        partial(failed, delivery_id=delivery.id, error="HTTP 503 " + "x" * 500, retry=at_once)
    )
    assert died is False
    [again] = (await db.write(claim)).deliveries
    assert again.attempts == 1
    assert again.last_error is not None
    assert len(again.last_error) == store.MAX_ERROR_LENGTH

    # Its next attempt would fall past the end of its retry period.
    before = await db.read(database_now)
    too_late = Retry(delay=10.0, deadline=before + 5.0)
    died = await db.write(partial(failed, delivery_id=again.id, error="timeout", retry=too_late))
    after = await db.read(database_now)
    assert died is True
    nothing = await db.write(claim)
    assert (nothing.deliveries, nothing.next_due_in) == ([], None)
    [dead] = await db.read(partial(store.listed, listing=DeliveryListing(dead=True), limit=10))
    assert (dead.attempts, dead.last_error) == (2, "timeout")
    assert dead.dead_at is not None
    assert before <= dead.dead_at <= after
    assert await db.read(partial(store.listed, listing=DeliveryListing(dead=False), limit=10)) == []
    eights = DeliveryListing(owners={"listing-8"})
    assert await db.read(partial(store.listed, listing=eights, limit=10)) == []
    assert await db.read(store.counts) == {"e": store.DeliveryCounts(pending=0, dead=1)}

    revive = partial(store.revive, delivery_ids=None)
    # Only to the endpoints named, and of the owners named.
    assert await db.write(partial(revive, endpoints=["other"])) == 0
    assert await db.write(partial(revive, endpoints=["e"], owners=["listing-8"])) == 0
    before = await db.read(database_now)
    assert await db.write(partial(revive, endpoints=["e"], owners=["listing-7"])) == 1
    after = await db.read(database_now)
    [revived] = (await db.write(claim)).deliveries
    assert (revived.attempts, revived.dead_at) == (0, None)
    # A new retry period, from now on the database's clock.
    assert before <= revived.created_at <= after

    # Due again an hour after the failure.
    before = await db.read(database_now)
    later = Retry(delay=3600.0, deadline=revived.created_at + 7200.0)
    assert await db.write(partial(failed, delivery_id=revived.id, error="x", retry=later)) is False
    after = await db.read(database_now)
    waiting = await db.write(claim)
    assert waiting.deliveries == []
    assert waiting.next_due_in is not None
    assert 3590.0 < waiting.next_due_in <= 3600.0
    [retrying] = await db.read(partial(store.listed, listing=DeliveryListing(dead=False), limit=10))
    assert retrying.next_attempt_at is not None
    assert before + 3600.0 <= retrying.next_attempt_at <= after + 3600.0
    rows = await db.read(
        lambda conn: conn.execute(sa.text("SELECT count(*) FROM webhook_deliveries")).scalar()
    )
    assert rows == 1


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


async def test_deliveries_to_endpoints_no_longer_named_are_dead_at_once(db: Database) -> None:
    """Claimed or not, once, by whichever of several replicas marking at once; the named
    endpoints' and the already dead untouched; the holder's late outcome changes nothing."""
    for revision in range(1, 4):
        await db.write(enqueue("m1", revision, [endpoint("gone"), endpoint("kept")]))
    [held] = (await db.write(claim_of("a", endpoint="gone", limit=1))).deliveries
    [died] = (await db.write(claim_of("a", endpoint="gone", limit=1))).deliveries
    never = Retry(delay=10.0, deadline=0.0)
    failed = partial(store.failed, claimer="a")
    assert await db.write(partial(failed, delivery_id=died.id, error="HTTP 500", retry=never))
    [listed_died] = await db.read(
        partial(store.listed, listing=DeliveryListing(dead=True), limit=10)
    )

    replicas = [db, *(Database(db.url) for _ in range(3))]
    try:
        before = await db.read(database_now)
        abandon = partial(store.abandon, named=["kept", "other"], error="no longer named")
        marked = await asyncio.gather(*(replica.write(abandon) for replica in replicas))
        after = await db.read(database_now)
    finally:
        for replica in replicas[1:]:
            await replica.close()
    assert sum(marked) == 2
    assert await db.write(abandon) == 0
    assert await db.read(store.counts) == {
        "gone": store.DeliveryCounts(pending=0, dead=3),
        "kept": store.DeliveryCounts(pending=3, dead=0),
    }
    gone = DeliveryListing(dead=True, endpoint="gone")
    dead = await db.read(partial(store.listed, listing=gone, limit=10))
    assert listed_died in dead
    for delivery in [d for d in dead if d != listed_died]:
        assert delivery.last_error == "no longer named"
        assert delivery.dead_at is not None
        assert before <= delivery.dead_at <= after
        assert delivery.next_attempt_at == delivery.dead_at
    # The holder's attempt ends after: neither its failure nor its success revives it.
    later = Retry(delay=0.0, deadline=float("inf"))
    assert await db.write(partial(failed, delivery_id=held.id, error="x", retry=later)) is False
    await db.write(partial(store.delivered, delivery_id=held.id, claimer="a"))
    assert await db.read(partial(store.listed, listing=gone, limit=10)) == dead
    assert (await db.write(claim_of("b", endpoint="gone"))).deliveries == []

    # None named: every live delivery is dead; named again, revived by hand.
    assert await db.write(partial(store.abandon, named=[], error="none")) == 3
    revive = partial(store.revive, delivery_ids=None, endpoints=["gone", "kept"])
    assert await db.write(revive) == 6
    assert len((await db.write(claim_of("b", endpoint="gone"))).deliveries) == 3
