"""The queue store with several processes' worth of stores on one database (issue 11): claims,
fencing, lease expiry, revisions, counts and the result cache's single flight, on SQLite and on
PostgreSQL. Each store has its own ``Database`` (its own connections), as replicas would.

The in-memory store passes the same tests (its replicas share one store): the fake the fast
tests of the queue's rules run on keeps the SQL stores' contract."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from analysis_service.config import RetryPolicy
from analysis_service.domain.cache import ResultCache
from analysis_service.domain.hub import StatusHub
from analysis_service.domain.models import (
    AttemptOutcome,
    ClaimedJob,
    JobResult,
    JobStatus,
    StatusEvent,
)
from analysis_service.domain.queue import JobQueue
from analysis_service.domain.store import (
    AttemptEnd,
    EventFilter,
    ExpiredLease,
    LogCompacted,
    NewResult,
    QueueStore,
)
from analysis_service.storage import events as event_log
from analysis_service.storage import results as result_rows
from analysis_service.storage import schema, turns
from analysis_service.storage.memory_store import MemoryQueueStore
from analysis_service.storage.queue_store import SqlQueueStore
from analysis_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from mediatag_common.database import Database, database_url
from tests.conftest import DATABASES, DatabaseUrls
from tests.postgres import PostgresServer
from tests.queue_support import spec


@dataclass
class Replica:
    store: QueueStore
    published: list[StatusEvent]


@pytest.fixture(params=[*DATABASES, "memory"])
async def replicas(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Replica]]:
    """A factory of stores on one fresh database, each with its own connections (or of
    replicas sharing one in-memory store)."""
    async for make in replicas_of(request, tmp_path):
        yield make


@pytest.fixture(params=["postgresql", "memory"])
async def shared_replicas(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Replica]]:
    """The same where several processes may share the store (not SQLite's case)."""
    async for make in replicas_of(request, tmp_path):
        yield make


async def replicas_of(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Replica]]:
    if request.param == "memory":
        published: list[StatusEvent] = []
        store = MemoryQueueStore(publish=published.extend, shared=True)
        yield lambda: Replica(store, published)
        return
    server = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    urls = DatabaseUrls(request.param, tmp_path / "databases", server)
    async for make in replicas_on(urls.new("queue")):
        yield make
    urls.drop()


async def replicas_on(url: str) -> AsyncIterator[Callable[[], Replica]]:
    databases: list[Database] = []

    def make() -> Replica:
        db = Database(url, synchronous="NORMAL")
        databases.append(db)
        published: list[StatusEvent] = []
        return Replica(SqlQueueStore(db, committed=published.extend), published)

    make()
    await databases[0].migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    yield make
    for db in databases:
        await db.close()


def completion(job: ClaimedJob) -> AttemptEnd:
    result = JobResult(("tag",), None, 4, "test", "1", reused=False)
    return AttemptEnd(
        job, JobStatus.COMPLETED, AttemptOutcome.COMPLETED, job.attempt, result=result
    )


def retry_now(lease: ExpiredLease) -> AttemptEnd:
    return AttemptEnd(
        lease.job, JobStatus.PENDING, AttemptOutcome.LEASE_EXPIRED, lease.job.attempt, delay=0.0
    )


async def all_events(replica: Replica) -> list[StatusEvent]:
    return await replica.store.events_after(0, EventFilter(), limit=100_000, with_embedding=False)


async def test_concurrent_claimers_never_get_the_same_job_and_revisions_have_no_gap(
    replicas: Callable[[], Replica], seed: int
) -> None:
    rng = random.Random(seed)
    stores = [replicas() for _ in range(3)]
    await stores[0].store.submit([spec(n) for n in range(300)], max_attempts=3)
    claimed: list[ClaimedJob] = []

    async def claimer(replica: Replica) -> None:
        while jobs := await replica.store.claim("h", rng.randint(1, 20), 30.0):
            claimed.extend(jobs)
            ends = await replica.store.end_attempts([completion(job) for job in jobs])
            assert all(event is not None for event in ends)

    await asyncio.gather(*(claimer(stores[n % 3]) for n in range(9)))

    assert sorted(job.spec.media_id for job in claimed) == [spec(n).media_id for n in range(300)]
    assert {(job.attempt, job.lease_token) for job in claimed} == {(1, 1)}
    events = await all_events(stores[0])
    # 300 submissions, 300 claims, 300 completions: revisions 1..900, in commit order.
    assert [e.revision for e in events] == list(range(1, 901))
    assert [e.event_time for e in events] == sorted(e.event_time for e in events)
    depth = await stores[1].store.depth()
    assert depth.counts == {
        JobStatus.PENDING: 0,
        JobStatus.PROCESSING: 0,
        JobStatus.COMPLETED: 300,
        JobStatus.FAILED: 0,
    }


async def test_a_late_completion_with_an_old_token_changes_nothing(
    replicas: Callable[[], Replica],
) -> None:
    first, second = replicas(), replicas()
    await first.store.submit([spec(1)], max_attempts=3)
    (stale,) = await first.store.claim("first", 1, 0.0)
    # The first worker stalls; its lease expires and the second takes the job over.
    assert [e.status for e in await second.store.expire_leases(retry_now)] == [JobStatus.PENDING]
    (current,) = await second.store.claim("second", 1, 30.0)
    assert (current.attempt, current.lease_token) == (2, 2)

    assert await first.store.end_attempts([completion(stale)]) == [None]
    assert not await first.store.renew(stale, 30.0)

    job = await second.store.get_job(spec(1).media_id, with_embedding=False)
    assert job is not None
    assert (job.status, job.lease_token) == (JobStatus.PROCESSING, 2)
    assert [e.status for e in await all_events(first)] == [
        JobStatus.PENDING,
        JobStatus.PROCESSING,
        JobStatus.PENDING,
        JobStatus.PROCESSING,
    ]
    (event,) = await second.store.end_attempts([completion(current)])
    assert event is not None
    assert event.status is JobStatus.COMPLETED


async def test_two_ends_of_one_job_in_one_group_write_only_the_holders_first(
    replicas: Callable[[], Replica],
) -> None:
    replica = replicas()
    await replica.store.submit([spec(1), spec(2)], max_attempts=3)
    first, second = await replica.store.claim("h", 2, 30.0)
    stale = replace(first, lease_token=first.lease_token - 1)
    release = AttemptEnd(
        second, JobStatus.PENDING, AttemptOutcome.RELEASED, second.attempt - 1, delay=0.0
    )

    # As if one by one: a stale end changes nothing; after the holder's end, the job is no
    # longer held and a second end of it changes nothing either.
    ended = await replica.store.end_attempts(
        [completion(stale), completion(first), completion(second), release]
    )

    assert [event is not None for event in ended] == [False, True, True, False]
    for claimed in (first, second):
        job = await replica.store.get_job(claimed.spec.media_id, with_embedding=False)
        assert job is not None
        assert (job.status, job.attempt) == (JobStatus.COMPLETED, 1)
    assert (await replica.store.depth()).counts[JobStatus.COMPLETED] == 2
    assert [e.revision for e in await all_events(replica)] == list(range(1, 7))


async def test_every_replica_reaping_at_once_expires_each_lease_once(
    replicas: Callable[[], Replica],
) -> None:
    stores = [replicas() for _ in range(3)]
    await stores[0].store.submit([spec(n) for n in range(40)], max_attempts=3)
    assert len(await stores[0].store.claim("gone", 40, 0.0)) == 40

    reaped = await asyncio.gather(*(r.store.expire_leases(retry_now) for r in stores * 2))

    expiries = sorted(event.media_id for events in reaped for event in events)
    assert expiries == [spec(n).media_id for n in range(40)]
    depth = await stores[0].store.depth()
    assert (depth.counts[JobStatus.PENDING], depth.counts[JobStatus.PROCESSING]) == (40, 0)


async def test_the_counts_agree_with_the_rows(replicas: Callable[[], Replica]) -> None:
    """The counts kept with each transition, after a mix of every kind of change."""
    replica = replicas()
    store = replica.store
    await store.submit([spec(n) for n in range(30)], max_attempts=1)
    await store.submit([spec(n) for n in range(25, 35)], max_attempts=1)
    jobs = await store.claim("h", 20, 30.0)
    failure = [
        AttemptEnd(job, JobStatus.FAILED, AttemptOutcome.FAILED, job.attempt) for job in jobs[:5]
    ]
    await store.end_attempts([completion(job) for job in jobs[5:15]] + failure)
    await store.retry([job.spec.media_id for job in jobs[:2]], owner_id="", status=JobStatus.FAILED)

    rows = await store.list_jobs(
        status=None, owner_id="", error_reason="", after=None, limit=1000, with_embedding=False
    )
    counted = Counter(job.status.value for job in rows)
    depth = await store.depth()
    assert {status.value: n for status, n in depth.counts.items() if n} == counted
    assert counted == {"PENDING": 17, "PROCESSING": 5, "COMPLETED": 10, "FAILED": 3}


async def test_identical_content_is_analysed_once_across_replicas(
    shared_replicas: Callable[[], Replica],
) -> None:
    """Three replicas each with a job of one cache key: one analysis; the result it
    stored with its job's completion serves the other two."""
    stores = [shared_replicas().store for _ in range(3)]
    await stores[0].submit([spec(n) for n in range(3)], max_attempts=3)
    jobs = [(await store.claim("h", 1, 60.0))[0] for store in stores]
    caches = [ResultCache(store, analyzer_name="test", analyzer_version="1") for store in stores]
    calls = 0
    started = asyncio.Event()
    release = asyncio.Event()

    async def analyse() -> JobResult:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        embedding = np.ones(4, dtype=np.float32)
        return JobResult(("tag",), embedding, 4, "test", "1", reused=False)

    key = caches[0].key("f" * 64, {})

    async def work(n: int) -> JobResult:
        async def complete(
            result: JobResult, result_key: str, new_result: NewResult | None
        ) -> None:
            end = AttemptEnd(
                jobs[n], JobStatus.COMPLETED, AttemptOutcome.COMPLETED, jobs[n].attempt,
                result=result, result_key=result_key, new_result=new_result,
            )  # fmt: skip
            assert await stores[n].end_attempts([end]) != [None]

        return await caches[n].get_or_compute(key, "f" * 64, analyse, complete)

    first = asyncio.create_task(work(0))
    await started.wait()
    others = [asyncio.create_task(work(n)) for n in (1, 2)]
    # Wherever the others are (looking, waiting on the claim, not started), the first's result
    # must serve them: let it finish.
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(first, *others)

    assert calls == 1
    assert [r.reused for r in results] == [False, True, True]
    completed = [await stores[0].get_job(job.spec.media_id, with_embedding=True) for job in jobs]
    assert [job.status if job else None for job in completed] == [JobStatus.COMPLETED] * 3
    assert all(job and job.result and job.result.tags == ("tag",) for job in completed)


async def test_a_claim_asked_for_after_the_result_is_stored_is_refused(
    replicas: Callable[[], Replica],
) -> None:
    """The interleaving behind a second analysis: B looks for the result before A stores it
    and asks for the claim after A has stored the result and dropped its claim."""
    first, second = replicas().store, replicas().store
    key = "k" * 64
    result = JobResult(("tag",), np.ones(4, dtype=np.float32), 4, "test", "1", reused=False)

    assert await first.take_analyses([key], "first", 60.0) == [True]
    assert await second.cached_results([key]) == [None]
    await first.store_result(key, "f" * 64, result, holder="first")

    (stored,) = await second.take_analyses([key], "second", 60.0)
    assert isinstance(stored, JobResult)
    assert stored.tags == ("tag",)
    assert stored.reused


async def _a_statement_waits_for_a_lock(engine: sa.Engine) -> None:
    """Return once a statement on ``engine``'s database waits for a lock held elsewhere."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    while True:
        with engine.connect() as conn:
            if conn.execute(query).scalar_one():
                return
        await asyncio.sleep(0.01)


async def test_a_claim_that_waited_for_the_result_s_commit_is_refused_not_taken(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """The interleaving behind a second analysis on PostgreSQL: B's claim statement starts
    before A's result commits, so it does not see the result, and meets A's claim while A's
    transaction ends it. The claim A leaves settled refuses B (a deleted one would let B take
    the key and analyse it again); B's next look finds the result."""
    urls = DatabaseUrls("postgresql", tmp_path / "databases", postgres)
    url = urls.new("race")
    key = "r" * 64
    result = JobResult(("tag",), np.ones(4, dtype=np.float32), 4, "test", "1", reused=False)
    engine = sa.create_engine(database_url(url))
    written, commit = threading.Event(), threading.Event()

    def store_and_hold_the_commit() -> None:
        with engine.begin() as conn:
            result_rows.store_result(conn, key, "f" * 64, result, time.time())
            result_rows.end_result_claim(conn, key, "first")
            written.set()
            commit.wait(30)

    try:
        async for make in replicas_on(url):
            first, second = make().store, make().store
            assert await first.take_analyses([key], "first", 60.0) == [True]
            holding = threading.Thread(target=store_and_hold_the_commit)
            holding.start()
            try:
                assert await asyncio.to_thread(written.wait, 30)
                claim = asyncio.create_task(second.take_analyses([key], "second", 60.0))
                await asyncio.wait_for(_a_statement_waits_for_a_lock(engine), 30)
            finally:
                commit.set()
                await asyncio.to_thread(holding.join, 30)
            assert await asyncio.wait_for(claim, 30) == [False]
            (found,) = await second.take_analyses([key], "second", 60.0)
            assert isinstance(found, JobResult)
            assert found.tags == ("tag",)
    finally:
        engine.dispose()
        urls.drop()


async def test_a_turn_that_waited_leaves_no_gap_for_jobs_submitted_meanwhile(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """A turn on PostgreSQL that ends a job and claims waits for the job's row (locked here);
    a job submitted meanwhile is one the turn's claim may find but its writes cannot see.
    The revisions stay gap-free (the counter moves by the changes written), and the new job
    is claimed by a later turn."""
    urls = DatabaseUrls("postgresql", tmp_path / "databases", postgres)
    url = urls.new("turn")
    engine = sa.create_engine(database_url(url))
    locked, release = threading.Event(), threading.Event()

    def lock_the_job(media_id: str) -> None:
        with engine.begin() as conn:
            conn.execute(
                sa.text("SELECT 1 FROM jobs WHERE media_id = :id FOR UPDATE"), {"id": media_id}
            )
            locked.set()
            release.wait(30)

    def end_and_claim(job: ClaimedJob) -> turns.TurnRows:
        with engine.connect() as conn:
            autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
            return turns.take_turn(
                autocommit, [completion(job)], claim_count=4, holder="h", lease_seconds=60.0
            )

    try:
        async for make in replicas_on(url):
            store = make().store
            await store.submit([spec(1)], max_attempts=3)
            (job,) = await store.claim("h", 1, 60.0)
            locking = threading.Thread(target=lock_the_job, args=(job.spec.media_id,))
            locking.start()
            try:
                assert await asyncio.to_thread(locked.wait, 30)
                turn = asyncio.create_task(asyncio.to_thread(end_and_claim, job))
                await asyncio.wait_for(_a_statement_waits_for_a_lock(engine), 30)
                await store.submit([spec(2)], max_attempts=3)
            finally:
                release.set()
                await asyncio.to_thread(locking.join, 30)
            wrote = await asyncio.wait_for(turn, 30)
            assert wrote.ended[0] is not None
            with engine.connect() as conn:
                revisions = (
                    conn.execute(sa.text("SELECT revision FROM events ORDER BY revision"))
                    .scalars()
                    .all()
                )
                counter = conn.execute(
                    sa.text("SELECT value FROM counters WHERE name = :name"),
                    {"name": schema.REVISION},
                ).scalar_one()
            assert revisions == list(range(1, counter + 1))
            claimed = [row.media_id for row in wrote.claimed]
            later = [job.spec.media_id for job in await store.claim("h", 4, 60.0)]
            assert sorted(claimed + later) == [spec(2).media_id]
    finally:
        engine.dispose()
        urls.drop()


async def test_compaction_drops_the_expired_claims_and_keeps_the_live_ones(
    databases: DatabaseUrls,
) -> None:
    """Claims of holders that stopped without ending them (and, on PostgreSQL, the claims
    settled by a stored result, once expired) do not pile up: compaction drops them."""
    url = databases.new("claims")
    live, abandoned = "l" * 64, "a" * 64
    engine = sa.create_engine(database_url(url))
    try:
        async for make in replicas_on(url):
            store = make().store
            assert await store.take_analyses([live, abandoned], "holder", 60.0) == [True, True]
            assert await store.take_analyses([abandoned], "holder", -1.0) == [True]
            await store.compact(max_age=3600.0, max_events=1000)
            with engine.connect() as conn:
                keys = conn.execute(sa.text("SELECT key FROM result_claims")).scalars().all()
            assert keys == [live]
    finally:
        engine.dispose()


async def test_a_live_claim_is_refused_to_others_and_an_expired_one_taken_over(
    shared_replicas: Callable[[], Replica],
) -> None:
    """A key's claim holds for its lease: another holder is refused while it lives, the
    holder itself may take it again, and once it has run out another takes it over."""
    first, second = shared_replicas().store, shared_replicas().store
    key = "c" * 64

    assert await first.take_analyses([key], "first", 60.0) == [True]
    assert await second.take_analyses([key], "second", 60.0) == [False]
    assert await first.take_analyses([key], "first", 60.0) == [True]
    # A lease already over (a negative one): the claim is free to take.
    assert await first.take_analyses([key], "first", -1.0) == [True]
    assert await second.take_analyses([key], "second", 60.0) == [True]
    assert await first.take_analyses([key], "first", 60.0) == [False]


async def test_one_take_analyses_answers_each_key_in_the_order_asked(
    shared_replicas: Callable[[], Replica],
) -> None:
    """Keys looked up together: a stored one gives its result, a free one is claimed, one
    under another holder's live claim is refused, each in its place; a key asked twice in
    one call is refused before anything is claimed."""
    first, second = shared_replicas().store, shared_replicas().store
    stored_key, free_key, held_key = "s" * 64, "f" * 64, "h" * 64
    result = JobResult(("tag",), np.ones(4, dtype=np.float32), 4, "test", "1", reused=False)
    await first.store_result(stored_key, "a" * 64, result, holder=None)
    assert await first.take_analyses([held_key], "first", 60.0) == [True]

    with pytest.raises(ValueError, match="distinct"):
        await second.take_analyses([free_key, free_key], "second", 60.0)
    assert await first.take_analyses([free_key], "first", 60.0) == [True]
    await first.drop_analysis(free_key, "first")

    held, found, free = await second.take_analyses([held_key, stored_key, free_key], "second", 60.0)
    assert (held, free) == (False, True)
    assert isinstance(found, JobResult)
    assert found.tags == ("tag",)
    assert found.reused
    # The free key is now the second's: the first is refused it.
    assert await first.take_analyses([free_key], "first", 60.0) == [False]


async def test_closing_the_queue_writes_its_completions_and_gives_back_its_jobs_claimed_ahead(
    databases: DatabaseUrls,
) -> None:
    """Completions written behind are committed by the time the queue closes; the jobs it
    claimed ahead that no worker started go back to PENDING without using an attempt (the
    worker pool releases the jobs its workers hold when it drains, before)."""
    db = Database(databases.new("ahead"), synchronous="NORMAL")
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    hub = StatusHub(buffer_size=64, max_watchers=8)
    store = SqlQueueStore(db, committed=hub.publish)
    queue = JobQueue(store, hub, RetryPolicy(), 30.0)
    result = JobResult(("tag",), None, 4, "test", "1", reused=False)
    try:
        await queue.submit([spec(n) for n in range(20)])
        claimed = [await queue.claim() for _ in range(10)]
        held = {job.spec.media_id for job in claimed if job is not None}
        assert len(held) == 10
        completions = [
            await queue.complete(job, result, "k" * 64) for job in claimed[:3] if job is not None
        ]

        await queue.close()
        assert [completion.result().status for completion in completions] == [
            JobStatus.COMPLETED
        ] * 3
        depth = await store.depth()
        assert [depth.counts[status] for status in JobStatus] == [10, 7, 3, 0]
        given_back = 0
        for number in range(20):
            job = await store.get_job(spec(number).media_id, with_embedding=False)
            assert job is not None
            if job.spec.media_id not in held:
                assert (job.status, job.attempt) == (JobStatus.PENDING, 0)
                if job.attempts:
                    # Its attempt tells it was never started (not of a worker that stopped).
                    (attempt,) = job.attempts
                    assert attempt.error is not None
                    assert (attempt.outcome, attempt.error.reason) == ("RELEASED", "NOT_STARTED")
                    given_back += 1
        assert given_back > 0, "no job was claimed ahead"
    finally:
        await db.close()


async def test_a_reader_behind_the_compacted_events_is_told_instead_of_missing_them(
    replicas: Callable[[], Replica],
) -> None:
    store = replicas().store
    await store.submit([spec(n) for n in range(5)], max_attempts=3)
    assert await store.compact(max_age=3600.0, max_events=2) == 3

    kept = await store.events_after(3, EventFilter(), limit=10, with_embedding=False)
    assert [event.revision for event in kept] == [4, 5]
    with pytest.raises(LogCompacted) as behind:
        await store.events_after(2, EventFilter(), limit=10, with_embedding=False)
    assert (behind.value.compacted_through, behind.value.revision) == (3, 5)
    assert await store.log_bounds() == (5, 3)


async def test_replicas_compacting_at_once_never_move_the_watermark_back(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """One replica compacts further than another (it keeps fewer events) and has not
    committed when the other starts: the other ends at the further watermark, not its own,
    so a reader resuming between the two is told the log was compacted rather than given
    it with a hole."""
    urls = DatabaseUrls("postgresql", tmp_path / "databases", postgres)
    url = urls.new("compaction")
    engine = sa.create_engine(database_url(url))
    compacted, commit = threading.Event(), threading.Event()

    def compact_and_hold_the_commit() -> None:
        with engine.begin() as conn:
            assert event_log.compact(conn, before_time=0.0, keep_last=2) == 3
            compacted.set()
            commit.wait(30)

    try:
        async for make in replicas_on(url):
            store, other = make().store, make().store
            await store.submit([spec(n) for n in range(5)], max_attempts=3)
            holding = threading.Thread(target=compact_and_hold_the_commit)
            holding.start()
            try:
                assert await asyncio.to_thread(compacted.wait, 30)
                # Keeping 4 events, this one would compact through revision 1 alone.
                compacting = asyncio.create_task(other.compact(max_age=3600.0, max_events=4))
                await asyncio.wait_for(_a_statement_waits_for_a_lock(engine), 30)
            finally:
                commit.set()
                await asyncio.to_thread(holding.join, 30)
            assert await asyncio.wait_for(compacting, 30) == 3
            assert await store.log_bounds() == (5, 3)
            with pytest.raises(LogCompacted):
                await store.events_after(2, EventFilter(), limit=10, with_embedding=False)
    finally:
        engine.dispose()
        urls.drop()


async def test_state_pages_go_by_media_id_each_as_of_its_own_read(
    replicas: Callable[[], Replica],
) -> None:
    store = replicas().store
    await store.submit([spec(n, priority=1 if n == 3 else 0) for n in range(5)], max_attempts=3)
    everything = EventFilter()

    first = await store.state_page(everything, after_media_id="", limit=2, with_embedding=False)
    assert (first.revision, first.compacted_through) == (5, 0)
    assert [state.media_id for state in first.states] == [spec(0).media_id, spec(1).media_id]
    assert all(state.initial_state and state.revision <= 5 for state in first.states)
    [claimed] = await store.claim("worker", 1, 60.0)
    assert claimed.spec.media_id == spec(3).media_id
    # The next page is read after the claim, and shows it.
    second = await store.state_page(
        everything, after_media_id=spec(1).media_id, limit=2, with_embedding=False
    )
    assert second.revision == 6
    assert [(s.media_id, s.status, s.revision <= 5) for s in second.states] == [
        (spec(2).media_id, JobStatus.PENDING, True),
        (spec(3).media_id, JobStatus.PROCESSING, False),
    ]
    assert second.states[1].revision == 6
    # The filters apply as the log's do.
    listed = EventFilter(media_ids=[spec(4).media_id, spec(0).media_id, "unknown"])
    page = await store.state_page(
        listed, after_media_id=spec(0).media_id, limit=10, with_embedding=False
    )
    assert [state.media_id for state in page.states] == [spec(4).media_id]
    nobody = await store.state_page(
        EventFilter(owner_id="nobody"), after_media_id="", limit=10, with_embedding=False
    )
    assert nobody.states == []
