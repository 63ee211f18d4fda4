"""What an analysis replica on PostgreSQL hands its watchers from the event log: never a gap
when the log was compacted past it, and a large commit of any replica as one burst, as on
SQLite. Replicas here are the domain's parts on one real PostgreSQL (store, tailer, hub,
watcher), so that a test can stop one replica's tailer; the end-to-end burst runs two real
servers."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc

from analysis_service.api.status_codes import STATUS_CODES
from analysis_service.config import AnalysisConfig
from analysis_service.domain.hub import StatusHub, Subscription, WatchFilter
from analysis_service.domain.models import Bookmark, JobStatus, StatusEvent
from analysis_service.domain.watch import StatusWatcher, WatchRequest
from analysis_service.errors import RevisionCompacted, WatcherTooSlow, WatchInterrupted
from analysis_service.server import create_server
from analysis_service.storage import tailer as tailer_module
from analysis_service.storage.queue_store import SqlQueueStore
from analysis_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK, job_count
from analysis_service.storage.tailer import EventTailer
from mediatag_common.database import SQLITE, Database, libpq_conninfo
from mediatag_common.grpc_server import channel_options
from mediatag_common.status import status_code
from tests.conftest import PATIENCE, DatabaseUrls, free_port, wait_until
from tests.queue_support import spec

# The service's default --watch-buffer.
BUFFER = 1024
# One commit of three pages of the tailer's reads: published page by page, a watcher that
# reads nothing meanwhile was cut off at the third.
BURST = 3 * tailer_module.PAGE


@dataclass
class Replica:
    """The parts of one analysis replica that carry the log to its watchers."""

    db: Database
    hub: StatusHub
    store: SqlQueueStore
    watcher: StatusWatcher
    # None on SQLite: its one process hands each commit to the hub itself.
    tailer: EventTailer | None

    def start_tailer(self) -> None:
        assert self.tailer is not None
        self.tailer.start(self.hub.current_revision, lambda: None)


@asynccontextmanager
async def replica(url: str) -> AsyncIterator[Replica]:
    """A replica on ``url``, assembled as ``server._assemble`` does, its tailer started."""
    db = Database(url)
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    hub = StatusHub(buffer_size=BUFFER, max_watchers=10)
    tailer = None if db.dialect == SQLITE else EventTailer(db, publish=hub.publish)
    store = SqlQueueStore(db, committed=hub.publish if tailer is None else tailer.committed)
    hub.current_revision, _ = await store.log_bounds()
    # Bookmarks only every PATIENCE: the streams here carry changes.
    node = Replica(db, hub, store, StatusWatcher(store, hub, bookmark_interval=PATIENCE), tailer)
    if tailer is not None:
        node.start_tailer()
    try:
        yield node
    finally:
        hub.close()
        if tailer is not None:
            await tailer.stop()
        await db.close()


async def next_change(changes: AsyncIterator[StatusEvent | Bookmark]) -> StatusEvent:
    async def first() -> StatusEvent:
        async for item in changes:
            if isinstance(item, StatusEvent):
                return item
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(first(), PATIENCE)


async def submit(node: Replica, numbers: Iterable[int]) -> None:
    await node.store.submit([spec(n) for n in numbers], max_attempts=3)


async def published(node: Replica, revision: int) -> None:
    async def reached() -> bool:
        return node.hub.current_revision >= revision

    await wait_until(reached)


async def test_a_replica_the_log_was_compacted_past_ends_its_watchers_who_resume_from_the_log(
    postgres_url: str,
) -> None:
    async with replica(postgres_url) as writer, replica(postgres_url) as reader:
        await submit(writer, range(1))
        stream = reader.watcher.watch(WatchRequest(start_revision=1))
        async with stream:
            changes = aiter(stream)
            await submit(writer, range(1, 2))
            assert (await next_change(changes)).revision == 2
            # The reader cannot read the log (stalled, or cut off from the database) while
            # the writer goes on and compaction drops what the reader has not read.
            assert reader.tailer is not None
            await reader.tailer.stop()
            await submit(writer, range(2, 8))
            assert await writer.store.compact(max_age=10**9, max_events=2) == 6
            reader.start_tailer()
            # Revisions 3 to 6 are gone: the watcher is ended, not handed 7 and 8.
            with pytest.raises(WatchInterrupted) as ended:
                await next_change(changes)
        # A status clients resume on, like a shutdown's.
        assert status_code(ended.value, STATUS_CODES) is grpc.StatusCode.UNAVAILABLE
        assert reader.hub.watcher_count == 0

        # Resuming from its last revision, it is told that revision is compacted ...
        async with reader.watcher.watch(WatchRequest(start_revision=2)) as resumed:
            with pytest.raises(RevisionCompacted):
                await next_change(aiter(resumed))
        # ... and starts over from the current state, then follows without a gap.
        async with reader.watcher.watch(WatchRequest(send_initial_state=True)) as again:
            items = aiter(again)
            states = [await anext(items) for _ in range(8)]
            assert sorted(state.revision for state in states) == [1, 2, 3, 4, 5, 6, 7, 8]
            assert await anext(items) == Bookmark(8, initial_state_end=True)
            await submit(writer, range(8, 9))
            assert (await next_change(items)).revision == 9


# SQLite (one process) is the reference; on PostgreSQL the commit comes through the tailer,
# read back when the watcher's own replica made it (larger than MAX_OWN_EVENTS) as when
# another did.
@pytest.mark.parametrize(
    ("databases", "committer"),
    [("sqlite", "own"), ("postgresql", "own"), ("postgresql", "other")],
    indirect=["databases"],
)
async def test_one_large_commit_is_one_burst_to_a_watcher_that_keeps_up(
    databases: DatabaseUrls, committer: str
) -> None:
    url = databases.new("analysis")
    async with AsyncExitStack() as replicas:
        watching = await replicas.enter_async_context(replica(url))
        writer = (
            await replicas.enter_async_context(replica(url)) if committer == "other" else watching
        )
        subscription = watching.hub.subscribe(WatchFilter())
        # One transaction of BURST changes (as a RetryJobs of that many failed jobs). The
        # watcher reads nothing until it is in, like a stream that sends slower than the
        # tailer reads pages: the commit finds it keeping up (nothing behind), so it is taken
        # whole, however the replica came by it.
        await submit(writer, range(BURST))
        await published(watching, BURST)
        assert await revisions(subscription, BURST) == list(range(1, BURST + 1))
        subscription.close()


async def test_a_long_read_of_the_log_reaches_watchers_in_bounded_parts(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two pages a part: what a watcher may hold stays bounded by the parts, not by how far
    # the replica is behind.
    monkeypatch.setattr(tailer_module, "MAX_PUBLISH", 2 * tailer_module.PAGE)
    async with replica(postgres_url) as watching, replica(postgres_url) as writer:
        within = watching.hub.subscribe(WatchFilter())
        await submit(writer, range(tailer_module.MAX_PUBLISH))
        await published(watching, tailer_module.MAX_PUBLISH)
        assert await revisions(within, tailer_module.MAX_PUBLISH) == list(
            range(1, tailer_module.MAX_PUBLISH + 1)
        )
        within.close()

        beyond = watching.hub.subscribe(WatchFilter())
        start = watching.hub.current_revision
        # Five pages: the first part is a burst, the second is taken from its end, and the
        # third finds the watcher a part behind.
        await submit(writer, range(start, start + 5 * tailer_module.PAGE))
        await published(watching, start + 5 * tailer_module.PAGE)
        with pytest.raises(WatcherTooSlow):
            await beyond.next(0)


async def test_a_watcher_reading_as_fast_as_it_can_takes_a_retry_of_thousands_from_another_replica(
    postgres_url: str, tmp_path: Path
) -> None:
    # The reported case, end to end: RetryJobs by filter through one server, watched
    # through another.
    async with (
        server(postgres_url, tmp_path / "a") as (retrying, _),
        server(postgres_url, tmp_path / "b") as (watching, watching_revision),
    ):
        for first in range(0, BURST, 1000):
            await retrying.SubmitJobs(
                apb.SubmitJobsRequest(jobs=[job_spec(n) for n in range(first, first + 1000)])
            )
        fail_every_job(postgres_url)

        async def caught_up() -> bool:
            return await watching_revision() == BURST

        await wait_until(caught_up)
        watch = watching.WatchStatus(apb.WatchStatusRequest(), timeout=PATIENCE)
        await watch.initial_metadata()

        async def read() -> list[int]:
            seen: list[int] = []
            async for item in watch:
                if item.HasField("change"):
                    seen.append(item.revision)
                    if len(seen) == BURST:
                        break
            return seen

        reader = asyncio.create_task(read())
        answer = await retrying.RetryJobs(
            apb.RetryJobsRequest(owner_id="owner", status=apb.PROCESSING_STATUS_FAILED)
        )
        assert answer.count == BURST
        assert await reader == list(range(BURST + 1, 2 * BURST + 1))
        watch.cancel()


async def revisions(subscription: Subscription, count: int) -> list[int]:
    taken = []
    for _ in range(count):
        event = await subscription.next(0)
        assert event is not None
        taken.append(event.revision)
    return taken


@asynccontextmanager
async def server(
    url: str, data_dir: Path
) -> AsyncIterator[tuple[analysis_pb2_grpc.AnalysisServiceAsyncStub, Callable[[], Awaitable[int]]]]:
    """A real analysis server on ``url`` without workers: its stub, and its current revision."""
    config = AnalysisConfig(
        port=free_port(), data_dir=data_dir, workers=0, metrics_port=None, database_url=url
    )
    host, port = await create_server(config)
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)

    async def revision() -> int:
        status = await stub.GetQueueStatus(apb.GetQueueStatusRequest())
        return status.current_revision

    try:
        yield stub, revision
    finally:
        await channel.close()
        await host.stop(1.0)


def job_spec(number: int) -> apb.JobSpec:
    return apb.JobSpec(
        media_id=f"m{number:05d}",
        owner_id="owner",
        sha256=hashlib.sha256(b"%d" % number).hexdigest(),
        size_bytes=10,
        content_type="image/jpeg",
    )


def fail_every_job(url: str) -> None:
    """Every job FAILED, its count with it: failed jobs to retry, without workers to fail them."""
    with psycopg.connect(libpq_conninfo(url), autocommit=True) as conn, conn.transaction():
        failed = conn.execute("UPDATE jobs SET status = %s", (JobStatus.FAILED.value,)).rowcount
        conn.execute(
            "UPDATE counters SET value = value + %s WHERE name = %s",
            (failed, job_count(JobStatus.FAILED)),
        )
        conn.execute(
            "UPDATE counters SET value = value - %s WHERE name = %s",
            (failed, job_count(JobStatus.PENDING)),
        )
