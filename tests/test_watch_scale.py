"""WatchStatus at scale: many watchers, slow consumers, compaction, restarts, cancelled streams."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.config import AnalysisConfig, RateLimitConfig, WatchConfig
from analysis_service.domain.hub import StatusHub, WatchFilter
from analysis_service.domain.models import JobStatus, StatusEvent
from mediatag_common.backoff import Backoff
from mediatag_common.errors import error_info
from mediatag_common.grpc_server import channel_options
from tests.conftest import PATIENCE, Cluster, free_port, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.media_samples import jpeg_bytes
from tests.test_metrics import scrape
from tests.test_pipeline import upload, wait_terminal

if TYPE_CHECKING:
    from mediatag.analysis.v1.analysis_pb2_grpc import AnalysisServiceAsyncStub as Stub


class OpenChannel(Protocol):
    def __call__(self, port: int, *options: tuple[str, Any]) -> grpc.aio.Channel: ...


TERMINAL = {apb.PROCESSING_STATUS_COMPLETED, apb.PROCESSING_STATUS_FAILED}
OWNERS = ("owner-a", "owner-b", "owner-c")
CLIENT_OPTIONS: list[tuple[str, Any]] = [
    # Its own connection per channel: by default, channels to one address share one.
    ("grpc.use_local_subchannel_pool", 1),
    # After a restart, reconnect within tenths of a second, not gRPC's default of one
    # second growing to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def small_images(count: int, first_seed: int) -> list[ipb.MediaFile]:
    """Distinct small photos: the local analyser takes ~7 ms on each, ~55 ms at 320x240."""
    return [
        ipb.MediaFile(filename=f"p{n}.jpg", content=jpeg_bytes(seed=n, size=(96, 72)))
        for n in range(first_seed, first_seed + count)
    ]


@pytest.fixture
async def channels() -> AsyncIterator[OpenChannel]:
    """A factory of client channels (with fast reconnects), all closed after the test."""
    opened: list[grpc.aio.Channel] = []

    def open_channel(port: int, *options: tuple[str, Any]) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[*channel_options(), *CLIENT_OPTIONS, *options]
        )
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        await channel.close()


def fast_cluster(
    make_cluster: Callable[..., Cluster],
    watch: WatchConfig,
    *,
    dimensions: int = 64,
    rate: float = 1000.0,
    metrics: bool = False,
    gate: asyncio.Event | None = None,
) -> Cluster:
    """A cluster whose analyser is fast and barely rate-limited (and holds its calls while
    ``gate`` is clear)."""
    return make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=dimensions, gate=gate),
        analysis_config=AnalysisConfig(
            embedding_dimensions=dimensions,
            rate_limits={"local": RateLimitConfig(rate, max(1, int(rate / 10)))},
            watch=watch,
            metrics_port=free_port() if metrics else None,
        ),
    )


async def current_revision(cluster: Cluster) -> int:
    status = await cluster.analysis.GetQueueStatus(apb.GetQueueStatusRequest())
    return status.current_revision


async def warmed_up(cluster: Cluster) -> int:
    """Start both services, complete one upload, return the revision to watch from.

    start_revision=0 means "from now", so the log must hold something first.
    """
    await cluster.start_analysis()
    await cluster.start_ingest()
    warm_up = await upload(cluster, small_images(1, first_seed=999_999))
    await wait_terminal(cluster, [warm_up.media[0].id])
    revision = await current_revision(cluster)
    assert revision > 0
    return revision


def is_change(response: apb.WatchStatusResponse) -> bool:
    return response.HasField("change")


def matches(request: apb.WatchStatusRequest, change: apb.StatusChange) -> bool:
    """The server's filter, restated on the client."""
    if request.media_ids and change.media_id not in request.media_ids:
        return False
    return not request.owner_id or change.owner_id == request.owner_id


class Watcher:
    """One WatchStatus stream read by its own task, keeping every message and its arrival time.

    With ``resume``, an UNAVAILABLE stream is watched again from the last revision received,
    with jittered backoff, the way clients survive a restart of the analysis service.
    """

    def __init__(
        self, stub: Stub, request: apb.WatchStatusRequest, *, resume: bool = False
    ) -> None:
        self.request = request
        self.received: list[apb.WatchStatusResponse] = []
        self.terminal_seen: set[str] = set()
        self.error: grpc.aio.AioRpcError | None = None
        self.ended_ok = False
        self.reconnects = 0
        self._stub = stub
        self._resume = resume
        self._call = stub.WatchStatus(request)
        self._task = asyncio.create_task(self._run())

    async def connected(self) -> None:
        await self._call.wait_for_connection()

    @property
    def done(self) -> bool:
        return self._task.done()

    def changes(self) -> list[apb.WatchStatusResponse]:
        return [r for r in self.received if is_change(r)]

    def saw_terminal(self, media_ids: Collection[str]) -> bool:
        return self.terminal_seen.issuperset(media_ids)

    async def _run(self) -> None:
        backoff = Backoff(0.05, 0.5)
        while True:
            try:
                async for response in self._call:
                    self.received.append(response)
                    if response.change.status in TERMINAL:
                        self.terminal_seen.add(response.change.media_id)
                    backoff.reset()
                self.ended_ok = True
                return
            except grpc.aio.AioRpcError as error:
                if not self._resume or error.code() is not grpc.StatusCode.UNAVAILABLE:
                    self.error = error
                    return
            finally:
                self._call.cancel()
            self.reconnects += 1
            await asyncio.sleep(backoff.next_delay())
            request = apb.WatchStatusRequest()
            request.CopyFrom(self.request)
            if self.received:
                request.start_revision = self.received[-1].revision
            self._call = self._stub.WatchStatus(request)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def reference(
    stub: Stub, start: int, through: int, *, include_embedding: bool = False
) -> list[apb.WatchStatusResponse]:
    """Every change after ``start`` up to ``through``, from one unfiltered stream."""
    assert through > start
    found: list[apb.WatchStatusResponse] = []
    request = apb.WatchStatusRequest(start_revision=start, include_embedding=include_embedding)
    call = stub.WatchStatus(request, timeout=PATIENCE)
    try:
        async for response in call:
            if is_change(response):
                found.append(response)
            if response.revision >= through:
                break
    finally:
        call.cancel()
    return found


def assert_exactly(
    watcher: Watcher, reference_changes: Iterable[apb.WatchStatusResponse], label: str
) -> None:
    """The watcher received exactly the reference changes its filter matches, in order."""
    expected = [r for r in reference_changes if matches(watcher.request, r.change)]
    revisions = [r.revision for r in watcher.received]
    assert revisions == sorted(revisions), f"{label}: revisions out of order"
    changes = watcher.changes()
    change_revisions = [r.revision for r in changes]
    repeated = [a for a, b in itertools.pairwise(change_revisions) if a >= b]
    assert not repeated, f"{label}: repeated revisions {repeated[:10]}"
    # A bookmark says "everything up to here was sent": no change may follow at or below it.
    bookmark = 0
    for response in watcher.received:
        if is_change(response):
            assert response.revision > bookmark, f"{label}: {response.revision} after {bookmark}"
        else:
            bookmark = response.revision
    missing = sorted({r.revision for r in expected} - set(change_revisions))
    unexpected = sorted(set(change_revisions) - {r.revision for r in expected})
    assert not missing, f"{label}: missing {missing[:10]} ({len(missing)} in all)"
    assert not unexpected, f"{label}: unexpected {unexpected[:10]} ({len(unexpected)} in all)"
    assert changes == expected, f"{label}: same revisions, different content"


async def watch_error(stub: Stub, request: apb.WatchStatusRequest) -> grpc.aio.AioRpcError | None:
    """The error a watch from a revision with events after it fails with; None when it
    streams them (the call is then cancelled)."""
    call = stub.WatchStatus(request, timeout=PATIENCE)
    try:
        await call.read()
    except grpc.aio.AioRpcError as error:
        return error
    finally:
        call.cancel()
    return None


def assert_each_item_went_once_through(
    changes: Iterable[apb.WatchStatusResponse], items: Collection[str]
) -> None:
    """Each of ``items`` went PENDING, PROCESSING, COMPLETED, and nothing else changed. On a
    loaded machine a claim may go back before it completes (a job claimed ahead that no
    worker started within a second, or an expired lease): PROCESSING, PENDING, once a time."""
    pending, processing, completed = (
        apb.PROCESSING_STATUS_PENDING,
        apb.PROCESSING_STATUS_PROCESSING,
        apb.PROCESSING_STATUS_COMPLETED,
    )
    statuses: dict[str, list[int]] = {}
    for response in changes:
        statuses.setdefault(response.change.media_id, []).append(response.change.status)
    assert statuses.keys() == set(items)
    for media_id, history in statuses.items():
        went_back = (len(history) - 3) // 2
        expected = [pending, *[processing, pending] * went_back, processing, completed]
        assert history == expected, (media_id, history)


# -- 1. many watchers ----------------------------------------------------------------------


async def test_500_watchers_on_shared_and_separate_channels_each_get_exactly_their_events(
    make_cluster: Callable[..., Cluster], channels: OpenChannel
) -> None:
    # Idle watchers get a bookmark every 0.5 s, so bookmarks interleave with live events.
    cluster = fast_cluster(make_cluster, WatchConfig(max_watchers=2000, bookmark_interval=0.5))
    start = await warmed_up(cluster)
    began = time.monotonic()
    port = cluster.analysis_port
    shared = analysis_pb2_grpc.AnalysisServiceStub(channels(port))
    spread = [analysis_pb2_grpc.AnalysisServiceStub(channels(port)) for _ in range(5)]

    def stub_for(n: int) -> Stub:
        # Even watchers share one channel; odd ones go round the five others (50 each).
        return shared if n % 2 == 0 else spread[n % 5]

    # 200 watchers before any upload: 40 of everything, 160 of one owner each.
    watchers: list[Watcher] = []
    for n in range(200):
        owner = "" if n < 40 else OWNERS[n % 3]
        request = apb.WatchStatusRequest(start_revision=start, owner_id=owner)
        watchers.append(Watcher(stub_for(n), request))
    await asyncio.gather(*(w.connected() for w in watchers))

    # 200 images in 50 uploads of 4, three owners. Media ids exist only once an upload is
    # answered, so the 300 id watchers (6 per upload) start right after their upload, from
    # the same start revision: their first events come from the log, the rest live. Some
    # also list an item of the previous upload, which may be done already.
    ids_by_owner: dict[str, set[str]] = {owner: set() for owner in OWNERS}
    batches: list[list[str]] = []
    for b in range(50):
        owner = OWNERS[b % 3]
        response = await upload(cluster, small_images(4, first_seed=10_000 + 4 * b), owner=owner)
        batch = [m.id for m in response.media]
        batches.append(batch)
        ids_by_owner[owner].update(batch)
        for k in range(6):
            listed = batch[: 1 + k % 4] + (batches[b - 1][-1:] if b and k >= 4 else [])
            request = apb.WatchStatusRequest(
                start_revision=start, media_ids=listed, until_terminal=True
            )
            watchers.append(Watcher(stub_for(len(watchers)), request))
    all_ids = set().union(*ids_by_owner.values())
    assert len(all_ids) == 200
    assert len(watchers) == 500

    def items_of(watcher: Watcher) -> set[str]:
        request = watcher.request
        if request.media_ids:
            return set(request.media_ids)
        return ids_by_owner[request.owner_id] if request.owner_id else all_ids

    async def every_watcher_saw_its_items_end() -> bool:
        return all(w.saw_terminal(items_of(w)) for w in watchers)

    await wait_until(every_watcher_saw_its_items_end, interval=0.1)

    # Id watchers end by themselves (until_terminal); the others are stopped here.
    async def id_watchers_ended() -> bool:
        return all(w.done for w in watchers[200:])

    await wait_until(id_watchers_ended)
    await asyncio.gather(*(w.stop() for w in watchers[:200]))

    final = await current_revision(cluster)
    reference_changes = await reference(cluster.analysis, start, final)
    assert len(reference_changes) == final - start
    assert_each_item_went_once_through(reference_changes, all_ids)
    for n, watcher in enumerate(watchers):
        assert watcher.error is None, (n, watcher.error)
        assert watcher.ended_ok == (n >= 200), n
        assert_exactly(watcher, reference_changes, f"watcher {n}")
    delivered = sum(len(w.received) for w in watchers)
    print(f"500 watchers: {delivered} messages in {time.monotonic() - began:.1f} s")


async def test_a_bookmark_never_runs_ahead_of_an_event_still_to_be_sent(
    make_cluster: Callable[..., Cluster], channels: OpenChannel
) -> None:
    # Bookmarks every 20 ms to 60 watchers of one item each. The analyses are held until every
    # watcher has had a bookmark covering every event so far, others' included: bookmarks
    # certainly fall between each watcher's own events. Then all go at once, and bookmark
    # timeouts fall as events are handed over (the exact lost race: the next test).
    gate = asyncio.Event()
    gate.set()
    cluster = fast_cluster(make_cluster, WatchConfig(bookmark_interval=0.02), gate=gate)
    start = await warmed_up(cluster)
    gate.clear()
    stub = analysis_pb2_grpc.AnalysisServiceStub(channels(cluster.analysis_port))
    watchers: list[Watcher] = []
    for b in range(6):
        response = await upload(cluster, small_images(10, first_seed=15_000 + 10 * b))
        for media in response.media:
            request = apb.WatchStatusRequest(
                start_revision=start, media_ids=[media.id], until_terminal=True
            )
            watchers.append(Watcher(stub, request))
    uploaded = await current_revision(cluster)

    async def each_bookmarked_past_every_upload() -> bool:
        return all(
            w.changes() and not is_change(w.received[-1]) and w.received[-1].revision >= uploaded
            for w in watchers
        )

    await wait_until(each_bookmarked_past_every_upload)
    gate.set()

    async def all_ended() -> bool:
        return all(w.done for w in watchers)

    await wait_until(all_ended)
    reference_changes = await reference(cluster.analysis, start, await current_revision(cluster))
    for n, watcher in enumerate(watchers):
        assert watcher.error is None, (n, watcher.error)
        assert_exactly(watcher, reference_changes, f"watcher {n}")
    # The race happened: each watcher had bookmarks between its own events, and all but the
    # one whose item has the newest event had one ahead of its last change, covering others'.
    ahead = [bookmarked_ahead_of_its_next_change(w) for w in watchers]
    assert all(ahead_by is not None for ahead_by in ahead), ahead
    assert sum(1 for ahead_by in ahead if ahead_by) >= len(watchers) - 1, ahead


def bookmarked_ahead_of_its_next_change(watcher: Watcher) -> int | None:
    """How far beyond the watcher's previous change the furthest bookmark before one of its
    changes went (in revisions); None if no bookmark came between two of its changes."""
    furthest: int | None = None
    previous: int | None = None
    since_previous: int | None = None  # the furthest bookmark since the previous change
    for response in watcher.received:
        if not is_change(response):
            if previous is not None:
                beyond = response.revision - previous
                since_previous = beyond if since_previous is None else max(since_previous, beyond)
            continue
        if since_previous is not None:
            furthest = since_previous if furthest is None else max(furthest, since_previous)
        previous, since_previous = response.revision, None
    return furthest


async def test_a_bookmark_timeout_that_loses_the_race_with_an_event_hands_the_event_on() -> None:
    """The idle timer of a watcher fires, and in the same turn of the loop, before the watcher
    resumes, an event for it is offered: it must get the event, not a bookmark (which would
    claim the event's revision before the event was sent)."""
    hub = StatusHub(buffer_size=8, max_watchers=8)
    racing = hub.subscribe(WatchFilter(media_ids=frozenset({"raced"})))
    # Its twin is offered nothing: its timer, which fires in the same turn, shows that it did.
    twin = hub.subscribe(WatchFilter(media_ids=frozenset({"other"})))
    loop = asyncio.get_running_loop()
    # Idle for 0 s: each next() arms a timer due at once, to fire in the loop's next turn.
    reads = [asyncio.create_task(racing.next(0.0)), asyncio.create_task(twin.next(0.0))]
    await asyncio.sleep(0)  # both are waiting, their timers armed
    # Due later than both timers, and due in the same turn: the loop runs due timers in the
    # order they fall due, and the readers resume only after (their wake-ups queue behind).
    armed = loop.time()
    while loop.time() <= armed:
        pass
    event = StatusEvent(
        revision=1,
        media_id="raced",
        owner_id="owner",
        status=JobStatus.PROCESSING,
        previous_status=JobStatus.PENDING,
        attempt=1,
        event_time=0.0,
    )
    loop.call_at(loop.time(), hub.publish, [event])
    raced, twin_read = await asyncio.gather(*reads)
    assert twin_read is None  # the idle timers fired in that turn
    assert raced == event
    assert hub.current_revision == 1


# -- 2. slow consumers -------------------------------------------------------------------


async def test_a_watcher_that_stops_reading_is_cut_off_while_a_reading_one_keeps_up(
    make_cluster: Callable[..., Cluster], channels: OpenChannel
) -> None:
    # Completed events carry a 1408-dim embedding (~6 KB): a watcher that stops reading fills
    # a 64 KB flow-control window within a dozen of them, then its 32-event buffer.
    cluster = fast_cluster(make_cluster, WatchConfig(stream_buffer=32), dimensions=1408)
    start = await warmed_up(cluster)
    port = cluster.analysis_port
    reader = Watcher(
        analysis_pb2_grpc.AnalysisServiceStub(channels(port)),
        apb.WatchStatusRequest(start_revision=start, include_embedding=True),
    )

    async def run(first_seed: int) -> set[str]:
        """Upload 40 images; their ids, once the reader saw all of them end."""
        ids: set[str] = set()
        for b in range(8):
            response = await upload(cluster, small_images(5, first_seed + 5 * b))
            ids.update(m.id for m in response.media)

        async def reader_saw_them_end() -> bool:
            return reader.saw_terminal(ids)

        await wait_until(reader_saw_them_end)
        return ids

    baseline_ids = await run(20_000)

    # One commit with more events than the buffer holds (a retry of 40 items) is taken
    # whole: the reader, which keeps up, is not cut off by it (what the commits after a burst
    # may add is tested on the hub, in test_watch_buffer). The queue is paused until the
    # reader is through the burst: the 40 jobs' next changes come at once (their results are
    # cached), and whether they come before it is through would be a race.
    await cluster.analysis.PauseQueue(apb.PauseQueueRequest())
    retried = await cluster.analysis.RetryJobs(apb.RetryJobsRequest(media_ids=baseline_ids))
    assert retried.count == 40 > 32
    burst_end = await current_revision(cluster)

    async def reader_read_the_burst() -> bool:
        return reader.done or any(r.revision >= burst_end for r in reader.received)

    await wait_until(reader_read_the_burst)
    await cluster.analysis.ResumeQueue(apb.ResumeQueueRequest())

    async def reader_saw_them_reprocessed() -> bool:
        ends = [r for r in reader.changes() if r.change.status in TERMINAL]
        return reader.done or sum(1 for r in ends if r.change.media_id in baseline_ids) == 80

    await wait_until(reader_saw_them_reprocessed)
    assert reader.error is None, reader.error

    # A watcher on its own channel that never reads. gRPC core advertises a window of at
    # least 4 MB per stream while BDP probing is on; with it off the window is HTTP/2's
    # default 64 KB, so the stall reaches the server's buffer within a dozen large events.
    stalled = analysis_pb2_grpc.AnalysisServiceStub(
        channels(port, ("grpc.http2.bdp_probe", 0))
    ).WatchStatus(apb.WatchStatusRequest(include_embedding=True))
    await stalled.wait_for_connection()
    await run(30_000)

    # Reading again, the stalled watcher gets what the transport held, then the refusal.
    late: list[apb.WatchStatusResponse] = []

    async def read_the_rest() -> None:
        async for response in stalled:
            late.append(response)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(read_the_rest(), PATIENCE)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(caught.value)
    assert info is not None
    assert (info.reason, info.domain) == ("WATCHER_TOO_SLOW", "mediatag")
    # What it got is a gap-free run of the reader's events, cut off before the end.
    assert late
    assert all(is_change(r) for r in late)
    since = [r for r in reader.changes() if r.revision >= late[0].revision]
    assert late == since[: len(late)]
    assert len(late) < len(since), (len(late), len(since))

    # The reader was never cut off and missed nothing.
    final = await current_revision(cluster)
    assert reader.error is None
    from_log = await reference(cluster.analysis, start, final, include_embedding=True)
    assert_exactly(reader, from_log, "reader")
    # That the stalled watcher does not hold the workers' commits is a rule of the hub's
    # pacing (test_delivery_pacing); how it moves delays is for benchmarks, not for a timed
    # comparison on a shared machine.


async def test_the_watcher_cap_refuses_more_and_a_cut_off_watcher_frees_its_slot_at_once(
    make_cluster: Callable[..., Cluster], channels: OpenChannel
) -> None:
    # Three slots, one of them held by the ingest service's status mirror (without tokens, all
    # of them one caller's: its share is all three).
    cluster = fast_cluster(
        make_cluster,
        WatchConfig(max_watchers=3, max_watchers_per_caller=3, stream_buffer=16),
        dimensions=1408,
    )
    start = await warmed_up(cluster)
    port = cluster.analysis_port
    stub = analysis_pb2_grpc.AnalysisServiceStub(channels(port))
    reader = Watcher(stub, apb.WatchStatusRequest(start_revision=start))
    await reader.connected()
    # Never reads: large events and HTTP/2's default 64 KB window (see the test above).
    stalled = analysis_pb2_grpc.AnalysisServiceStub(
        channels(port, ("grpc.http2.bdp_probe", 0))
    ).WatchStatus(apb.WatchStatusRequest(include_embedding=True))
    await stalled.wait_for_connection()

    async def one_more_watcher() -> grpc.aio.UnaryStreamCall[Any, Any] | grpc.aio.AioRpcError:
        call = stub.WatchStatus(apb.WatchStatusRequest())
        try:
            await call.wait_for_connection()
            if call.done():
                await call.read()  # raises the refusal
        except grpc.aio.AioRpcError as error:
            return error
        return call

    refusal = await one_more_watcher()
    assert isinstance(refusal, grpc.aio.AioRpcError)
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refusal)
    assert info is not None
    assert (info.reason, info.metadata["maxWatchers"]) == ("TOO_MANY_WATCHERS", "3")

    # The cap never holds up uploads: these complete while every slot is taken.
    response = await upload(cluster, small_images(30, first_seed=70_000))
    ids = {m.id for m in response.media}

    async def reader_saw_them_end() -> bool:
        return reader.saw_terminal(ids)

    await wait_until(reader_saw_them_end)

    # The stalled watcher has been cut off, and its slot is free while its client still
    # does not read.
    admitted: list[grpc.aio.UnaryStreamCall[Any, Any]] = []

    async def a_slot_is_free() -> bool:
        attempt = await one_more_watcher()
        if isinstance(attempt, grpc.aio.AioRpcError):
            refused = error_info(attempt)
            assert refused is not None
            assert refused.reason == "TOO_MANY_WATCHERS"
            return False
        admitted.append(attempt)
        return True

    await wait_until(a_slot_is_free)
    admitted[0].cancel()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stalled:
            pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "WATCHER_TOO_SLOW"

    # The reader, which kept up, was neither cut off nor missed anything.
    final = await current_revision(cluster)
    assert reader.error is None
    reference_changes: list[apb.WatchStatusResponse] = []

    async def referenced() -> bool:
        # The reference is one more watcher: the server frees the slot of the one cancelled
        # above when it has seen the cancellation, which a loaded machine may delay.
        try:
            reference_changes.extend(await reference(cluster.analysis, start, final))
        except grpc.aio.AioRpcError as error:
            refused = error_info(error)
            if refused is None or refused.reason != "TOO_MANY_WATCHERS":
                raise
            return False
        return True

    await wait_until(referenced)
    assert_exactly(reader, reference_changes, "reader")


# -- 3. compaction -------------------------------------------------------------------------


async def test_a_resume_from_a_compacted_revision_is_out_of_range_with_the_log_bounds(
    make_cluster: Callable[..., Cluster],
) -> None:
    retained = 20
    cluster = fast_cluster(
        make_cluster, WatchConfig(retention_events=retained, compaction_interval=0.1)
    )
    start = await warmed_up(cluster)
    response = await upload(cluster, small_images(10, first_seed=40_000))
    ids = {m.id for m in response.media}
    await wait_terminal(cluster, list(ids))
    current = await current_revision(cluster)
    assert current - start == 30
    oldest = current - retained + 1
    stub = cluster.analysis

    async def compacted_to_the_newest_twenty() -> bool:
        error = await watch_error(stub, apb.WatchStatusRequest(start_revision=1))
        info = error_info(error) if error is not None else None
        return info is not None and info.metadata.get("oldestRevision") == str(oldest)

    # Half the default compaction interval (60 s): only the configured one explains it.
    await wait_until(compacted_to_the_newest_twenty)

    error = await watch_error(stub, apb.WatchStatusRequest(start_revision=oldest - 2))
    assert error is not None
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(error)
    assert info is not None
    assert (info.reason, info.domain) == ("REVISION_COMPACTED", "mediatag")
    assert dict(info.metadata) == {"oldestRevision": str(oldest), "currentRevision": str(current)}

    # Resuming from just before the oldest kept revision loses nothing, so it is allowed.
    kept = await reference(stub, oldest - 1, current)
    assert [r.revision for r in kept] == list(range(oldest, current + 1))

    # As the refusal says: watch again with the initial state.
    call = stub.WatchStatus(apb.WatchStatusRequest(send_initial_state=True), timeout=PATIENCE)
    initial: list[apb.WatchStatusResponse] = []
    async for r in call:
        initial.append(r)
        if not is_change(r):
            break
    call.cancel()
    *states, end = initial
    assert end.bookmark.initial_state_end
    assert end.revision == current
    assert ids < {s.change.media_id for s in states}
    assert all(s.change.status == apb.PROCESSING_STATUS_COMPLETED for s in states)


async def test_the_ingest_mirror_resyncs_by_itself_after_its_revision_was_compacted(
    make_cluster: Callable[..., Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    retained = 12
    cluster = fast_cluster(
        make_cluster, WatchConfig(retention_events=retained, compaction_interval=0.1)
    )
    await warmed_up(cluster)
    response = await upload(cluster, small_images(4, first_seed=50_000))
    ids = [m.id for m in response.media]
    before = {m.id: m for m in await wait_terminal(cluster, ids)}
    assert not any(m.reused for m in before.values())
    await cluster.stop_ingest()
    mirrored = await current_revision(cluster)  # the mirror's revision is at most this

    # While ingest is down, reprocess the items twice (their results come from the cache,
    # so no content is fetched from ingest): 24 events, more than the 12 the log keeps.
    for _ in range(2):
        retried = await cluster.analysis.RetryJobs(apb.RetryJobsRequest(media_ids=ids))
        assert retried.count == len(ids)

        async def reprocessed() -> bool:
            for media_id in ids:
                job = (await cluster.analysis.GetJob(apb.GetJobRequest(media_id=media_id))).job
                if job.status != apb.PROCESSING_STATUS_COMPLETED:
                    return False
            return True

        await wait_until(reprocessed)

    async def mirror_revision_compacted() -> bool:
        error = await watch_error(cluster.analysis, apb.WatchStatusRequest(start_revision=mirrored))
        return error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE

    await wait_until(mirror_revision_compacted)

    caplog.set_level(logging.WARNING, logger="ingest_service.domain.mirror")
    await cluster.start_ingest()
    jobs = {
        media_id: (await cluster.analysis.GetJob(apb.GetJobRequest(media_id=media_id))).job
        for media_id in ids
    }

    async def mirror_shows_the_latest_state() -> bool:
        for media_id in ids:
            # wait_for_ready: the workers' reads of the jobs' bytes, refused while ingest was
            # down, leave the address's connection backing off (channels share it).
            request = ipb.GetMediaRequest(media_id=media_id)
            call = cluster.ingest.GetMedia(request, timeout=PATIENCE, wait_for_ready=True)
            media = (await call).media
            if media.status_revision != jobs[media_id].revision:
                return False
        return True

    await wait_until(mirror_shows_the_latest_state)
    for media_id in ids:
        media = (await cluster.ingest.GetMedia(ipb.GetMediaRequest(media_id=media_id))).media
        assert media.status == ipb.PROCESSING_STATUS_COMPLETED
        assert media.reused  # the reprocessed result, not the one from before the outage
        assert list(media.tags) == list(before[media_id].tags)
    assert any("cannot be resumed (REVISION_COMPACTED)" in r.getMessage() for r in caplog.records)

    # And it follows live events again.
    later = await upload(cluster, small_images(1, first_seed=50_100))
    (done,) = await wait_terminal(cluster, [later.media[0].id])
    assert done.status == ipb.PROCESSING_STATUS_COMPLETED


async def test_a_catch_up_overtaken_by_compaction_fails_instead_of_skipping_events(
    make_cluster: Callable[..., Cluster], channels: OpenChannel
) -> None:
    # The log keeps 520 events; a catch-up reads it 500 events at a time. Completed events
    # carry a 256-dim embedding (~1 KB): a 64 KB window holds about 150 events.
    retained = 520
    cluster = fast_cluster(
        make_cluster,
        WatchConfig(retention_events=retained, compaction_interval=0.1),
        dimensions=256,
    )
    await warmed_up(cluster)
    # 100 items, 4 copies of 25 images: all but 25 reuse a result from the cache.
    ids: list[str] = []
    for _ in range(4):
        response = await upload(cluster, small_images(25, first_seed=70_000))
        ids.extend(m.id for m in response.media)

    async def all_completed() -> bool:
        status = await cluster.analysis.GetQueueStatus(apb.GetQueueStatusRequest())
        counts = {c.status: c.count for c in status.counts}
        return counts.get(apb.PROCESSING_STATUS_COMPLETED) == len(ids) + 1 == sum(counts.values())

    async def reprocess() -> None:
        """Three more events per item (PENDING, PROCESSING, COMPLETED from the cache)."""
        await cluster.analysis.RetryJobs(apb.RetryJobsRequest(media_ids=ids))
        await wait_until(all_completed)

    async def compacted_past(revision: int) -> bool:
        error = await watch_error(cluster.analysis, apb.WatchStatusRequest(start_revision=revision))
        return error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE

    await wait_until(all_completed)
    await reprocess()
    current = await current_revision(cluster)
    start = current - retained  # the oldest revision a watch may still start from
    await wait_until(lambda: compacted_past(start - 1))

    # A watcher with a 64 KB window (see the slow-consumer test) reads one event of its
    # catch-up and stops: its first page of 500 events is read; the server waits on the window.
    call = analysis_pb2_grpc.AnalysisServiceStub(
        channels(cluster.analysis_port, ("grpc.http2.bdp_probe", 0))
    ).WatchStatus(apb.WatchStatusRequest(start_revision=start, include_embedding=True))
    first = await call.read()
    assert isinstance(first, apb.WatchStatusResponse)
    assert first.revision == start + 1
    # Meanwhile more than the log keeps happens: compaction passes the end of that page.
    await reprocess()
    await reprocess()
    final = await current_revision(cluster)
    await wait_until(lambda: compacted_past(start + 500))

    revisions = [first.revision]

    async def read_on() -> grpc.aio.AioRpcError | None:
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                assert isinstance(response, apb.WatchStatusResponse)
                if is_change(response):
                    revisions.append(response.revision)
                if response.revision >= final:
                    return None
        except grpc.aio.AioRpcError as error:
            return error
        return None

    error = await asyncio.wait_for(read_on(), PATIENCE)
    call.cancel()
    gaps = [(a, b) for a, b in itertools.pairwise(revisions) if b != a + 1]
    assert not gaps, f"events skipped between {gaps}"
    assert error is not None, "the watch went on past events it could no longer send"
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(error)
    assert info is not None
    assert info.reason == "REVISION_COMPACTED"
    assert int(info.metadata["oldestRevision"]) > revisions[-1] + 1
    assert info.metadata["currentRevision"] == str(final)


# -- 4. restarts -----------------------------------------------------------------------------


async def test_watchers_resume_across_a_restart_of_the_analysis_service_and_miss_nothing(
    make_cluster: Callable[..., Cluster], channels: OpenChannel
) -> None:
    # 30 analyser calls a second, so the restart lands while jobs are still flowing.
    cluster = fast_cluster(make_cluster, WatchConfig(bookmark_interval=0.2), rate=30)
    start = await warmed_up(cluster)
    stubs = [analysis_pb2_grpc.AnalysisServiceStub(channels(cluster.analysis_port)) for _ in "abc"]
    watchers = [
        Watcher(
            stubs[n % 3],
            apb.WatchStatusRequest(start_revision=start, owner_id="" if n < 4 else OWNERS[n % 2]),
            resume=True,
        )
        for n in range(8)
    ]
    ids_by_owner: dict[str, set[str]] = {owner: set() for owner in OWNERS[:2]}
    for b in range(8):
        owner = OWNERS[b % 2]
        response = await upload(cluster, small_images(5, first_seed=60_000 + 5 * b), owner=owner)
        batch = [m.id for m in response.media]
        ids_by_owner[owner].update(batch)
        request = apb.WatchStatusRequest(start_revision=start, media_ids=batch, until_terminal=True)
        watchers.append(Watcher(stubs[b % 3], request, resume=True))
    all_ids = set().union(*ids_by_owner.values())

    async def mid_stream() -> bool:
        return len(watchers[0].changes()) >= 40

    # Every stream open first (response headers mean the hub has registered it): one still
    # being set up as the service stops would be cancelled, not told to come back.
    await asyncio.gather(*(w.connected() for w in watchers))
    await wait_until(mid_stream)
    streaming = [n for n, w in enumerate(watchers) if not w.done]
    assert len(streaming) >= 8
    assert len(watchers[0].changes()) < 3 * len(all_ids), "the restart came too late"
    await cluster.stop_analysis(grace=0.5)
    await cluster.start_analysis()

    def items_of(watcher: Watcher) -> set[str]:
        request = watcher.request
        if request.media_ids:
            return set(request.media_ids)
        return ids_by_owner[request.owner_id] if request.owner_id else all_ids

    async def every_watcher_saw_its_items_end() -> bool:
        return all(w.saw_terminal(items_of(w)) for w in watchers)

    await wait_until(every_watcher_saw_its_items_end)
    await asyncio.gather(*(w.stop() for w in watchers[:8]))
    final = await current_revision(cluster)
    reference_changes = await reference(cluster.analysis, start, final)
    assert {r.change.media_id for r in reference_changes} == all_ids
    for n, watcher in enumerate(watchers):
        assert watcher.error is None, (n, watcher.error)
        # Streaming when the restart began, it came back; unless it was an until_terminal
        # watch whose items all ended as the service was stopping.
        if n in streaming and not watcher.ended_ok:
            assert watcher.reconnects >= 1, n
        assert_exactly(watcher, reference_changes, f"watcher {n}")


# -- 5. cancelled streams ---------------------------------------------------------------------


def resident_bytes() -> int:
    """The process's resident memory once garbage and the allocator's free lists are gone."""
    gc.collect()
    # glibc keeps freed memory mapped; trimming makes RSS follow what is still in use.
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_cancelled_streams_leave_no_watcher_and_no_memory_behind(
    make_cluster: Callable[..., Cluster], channels: OpenChannel
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig(max_watchers=2000), metrics=True)
    start = await warmed_up(cluster)
    assert cluster.analysis_config is not None
    assert cluster.analysis_config.metrics_port
    metrics_port = cluster.analysis_config.metrics_port
    await cluster.stop_ingest()  # its status mirror is a watcher too
    stubs = [analysis_pb2_grpc.AnalysisServiceStub(channels(cluster.analysis_port)) for _ in "ab"]
    # Every kind of stream: from now, with the initial state, and caught up from the log.
    requests = [
        apb.WatchStatusRequest(),
        apb.WatchStatusRequest(send_initial_state=True),
        apb.WatchStatusRequest(start_revision=start - 1),
    ]

    async def watchers_are(count: int) -> None:
        async def reached() -> bool:
            return (await scrape(metrics_port)).get("mediatag_watchers") == count

        await wait_until(reached)

    async def open_and_cancel(total: int, batch: int = 250) -> None:
        for _ in range(total // batch):
            calls = [stubs[n % 2].WatchStatus(requests[n % 3]) for n in range(batch)]
            await asyncio.gather(*(call.wait_for_connection() for call in calls))
            await watchers_are(batch)
            for call in calls:
                call.cancel()
            await watchers_are(0)

    await watchers_are(0)

    # Warm up until the allocator and gRPC's pools have grown to their working size: the
    # resident size then drifts by a megabyte or two, up and down, over thousands of streams.
    await open_and_cancel(1500)
    before = resident_bytes()
    await open_and_cancel(3000)
    growth = resident_bytes() - before
    print(f"resident memory growth over 3000 cancelled streams: {growth / 1e6:.2f} MB")
    # Anything a stream left behind would add up: 1.5 KB a stream would already be 4.5 MB.
    assert growth < 4_000_000, growth
