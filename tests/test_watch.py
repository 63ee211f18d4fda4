"""WatchStatus: ordered, gap-free, resumable streams."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.config import AnalysisConfig, RateLimitConfig, WatchConfig
from mediatag_common.errors import error_info, field_violations
from tests.conftest import ON_BOTH_DATABASES, PATIENCE, Cluster, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.test_pipeline import image_files, upload, wait_terminal

TERMINAL = {apb.PROCESSING_STATUS_COMPLETED, apb.PROCESSING_STATUS_FAILED}

# The analysis service on SQLite and on PostgreSQL.
pytestmark = ON_BOTH_DATABASES


async def started_cluster(
    make_cluster: Callable[..., Cluster], rate: float = 20, watch: WatchConfig | None = None
) -> Cluster:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(dimensions=64),
        analysis_config=AnalysisConfig(
            embedding_dimensions=64,
            rate_limits={"local": RateLimitConfig(rate, 1)},
            watch=watch or WatchConfig(),
        ),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    return cluster


async def current_revision(cluster: Cluster) -> int:
    status = await cluster.analysis.GetQueueStatus(apb.GetQueueStatusRequest())
    return status.current_revision


def changes(responses: list[apb.WatchStatusResponse]) -> list[tuple[int, str, int]]:
    return [
        (r.revision, r.change.media_id, r.change.status)
        for r in responses
        if r.WhichOneof("event") == "change"
    ]


async def test_resumed_watcher_receives_every_later_event_once_in_order(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = await started_cluster(make_cluster, rate=10)
    # start_revision=0 means "from now": let the log hold something first.
    warm_up = await upload(cluster, image_files(1, first_seed=90))
    await wait_terminal(cluster, [warm_up.media[0].id])
    start = await current_revision(cluster)
    assert start > 0
    response = await upload(cluster, image_files(8))
    ids = [m.id for m in response.media]

    # The reference: one uninterrupted stream of every event of these items.
    reference = [
        r
        async for r in cluster.analysis.WatchStatus(
            apb.WatchStatusRequest(start_revision=start, media_ids=ids, until_terminal=True)
        )
    ]

    # A watcher that leaves after a few events and comes back from its last revision.
    first_part: list[apb.WatchStatusResponse] = []
    call = cluster.analysis.WatchStatus(apb.WatchStatusRequest(start_revision=start, media_ids=ids))
    async for r in call:
        first_part.append(r)
        if len(first_part) == 7:
            break
    call.cancel()
    resumed = [
        r
        async for r in cluster.analysis.WatchStatus(
            apb.WatchStatusRequest(
                start_revision=first_part[-1].revision, media_ids=ids, until_terminal=True
            )
        )
    ]

    combined = changes(first_part) + changes(resumed)
    assert combined == changes(reference)
    revisions = [revision for revision, _, _ in combined]
    assert revisions == sorted(set(revisions))
    # Each item: PENDING (submitted) -> PROCESSING -> COMPLETED.
    for media_id in ids:
        statuses = [status for _, mid, status in combined if mid == media_id]
        assert statuses == [
            apb.PROCESSING_STATUS_PENDING,
            apb.PROCESSING_STATUS_PROCESSING,
            apb.PROCESSING_STATUS_COMPLETED,
        ]
    completed = [r.change for r in reference if r.change.status == apb.PROCESSING_STATUS_COMPLETED]
    assert all(c.result.tags and c.result.analyzer_name == "local" for c in completed)
    assert all(not c.result.embedding for c in completed)  # only with include_embedding


async def test_a_resumed_watch_ends_its_replay_with_a_bookmark_at_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    # No idle bookmark comes during the test: each one seen is the end of a replay.
    cluster = await started_cluster(make_cluster, watch=WatchConfig(bookmark_interval=600.0))
    quiet = await upload(cluster, image_files(1, first_seed=90))
    await wait_terminal(cluster, [quiet.media[0].id])
    start = await current_revision(cluster)
    busy = await upload(cluster, image_files(2))
    busy_ids = [m.id for m in busy.media]
    await wait_terminal(cluster, busy_ids)
    current = await current_revision(cluster)

    async def until_bookmark(media_ids: list[str]) -> list[apb.WatchStatusResponse]:
        call = cluster.analysis.WatchStatus(
            apb.WatchStatusRequest(start_revision=start, media_ids=media_ids)
        )
        read: list[apb.WatchStatusResponse] = []
        async with asyncio.timeout(PATIENCE):
            async for response in call:
                read.append(response)
                if response.WhichOneof("event") == "bookmark":
                    break
        call.cancel()
        return read

    # The changes since the revision, then a bookmark at the log's current revision.
    *replayed, end = await until_bookmark(busy_ids)
    assert len(changes(replayed)) == len(replayed) == 3 * len(busy_ids)
    assert (end.revision, end.bookmark.initial_state_end) == (current, False)
    # A filter that matched nothing since: the bookmark first, not at the next idle one.
    (end,) = await until_bookmark([quiet.media[0].id])
    assert end.revision == current


async def test_initial_state_then_bookmark_then_live_events(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = await started_cluster(make_cluster)
    done = await upload(cluster, image_files(2))
    await wait_terminal(cluster, [m.id for m in done.media])

    call = cluster.analysis.WatchStatus(
        apb.WatchStatusRequest(send_initial_state=True, include_embedding=True)
    )
    initial: list[apb.WatchStatusResponse] = []
    async for r in call:
        initial.append(r)
        if r.WhichOneof("event") == "bookmark":
            break
    *states, bookmark = initial
    assert bookmark.bookmark.initial_state_end
    assert {s.change.media_id for s in states} == {m.id for m in done.media}
    assert all(s.change.initial_state for s in states)
    assert all(len(s.change.result.embedding) == 64 for s in states)
    # Read by media id, a page at a time; nothing changed meanwhile, so all as of the bookmark.
    assert [s.change.media_id for s in states] == sorted(s.change.media_id for s in states)
    assert bookmark.revision >= max(s.revision for s in states)

    later = await upload(cluster, image_files(1, first_seed=50))
    live: list[apb.WatchStatusResponse] = []
    async for r in call:
        live.append(r)
        if r.change.status == apb.PROCESSING_STATUS_COMPLETED:
            break
    call.cancel()
    assert {r.change.media_id for r in live} == {later.media[0].id}
    assert all(r.revision > bookmark.revision for r in live)
    assert not any(r.change.initial_state for r in live)


async def test_idle_bookmarks_carry_the_current_revision_and_only_follow_silence(
    make_cluster: Callable[..., Cluster],
) -> None:
    interval = 0.3
    cluster = await started_cluster(make_cluster, watch=WatchConfig(bookmark_interval=interval))
    arrivals: list[tuple[float, apb.WatchStatusResponse]] = []
    watch_began = time.time()
    call = cluster.analysis.WatchStatus(apb.WatchStatusRequest())

    async def read() -> None:
        async for response in call:
            arrivals.append((time.time(), response))

    def bookmarks_from(index: int) -> Callable[[], Awaitable[bool]]:
        async def seen() -> bool:
            bookmarks = [r for _, r in arrivals[index:] if r.WhichOneof("event") == "bookmark"]
            return len(bookmarks) >= 2

        return seen

    reading = asyncio.create_task(read())
    try:
        # Idle: bookmarks, each with the revision of the log's newest event.
        await wait_until(bookmarks_from(0))
        before = await current_revision(cluster)
        assert all(r.revision == before for _, r in arrivals)

        # Busy: events closer together than the interval; then idle again.
        response = await upload(cluster, image_files(6, first_seed=300))
        await wait_terminal(cluster, [m.id for m in response.media])
        after = await current_revision(cluster)
        await wait_until(bookmarks_from(len(arrivals)))
    finally:
        call.cancel()
        await asyncio.gather(reading, return_exceptions=True)

    changes_seen = [r.revision for _, r in arrivals if r.WhichOneof("event") == "change"]
    assert changes_seen == list(range(before + 1, after + 1))
    assert arrivals[-1][1].revision == after
    # A bookmark comes only after an interval with nothing sent, never between events that
    # come faster: the n-th bookmark after a change (or after the watch began) comes at least
    # n intervals after it. Timed from the change's commit on the server, which a loaded
    # machine can only make look longer (arrivals here may bunch up), never shorter.
    since, bookmarks = watch_began, 0
    for at, message in arrivals:
        if message.WhichOneof("event") == "change":
            since, bookmarks = message.change.event_time.ToNanoseconds() / 1e9, 0
        else:
            bookmarks += 1
            assert at - since > bookmarks * interval * 0.8, (at - since, bookmarks, message)


async def test_until_terminal_ends_at_once_for_items_already_terminal(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = await started_cluster(make_cluster)
    response = await upload(cluster, image_files(2))
    ids = [m.id for m in response.media]
    await wait_terminal(cluster, ids)

    plain = [
        r
        async for r in cluster.analysis.WatchStatus(
            apb.WatchStatusRequest(media_ids=ids, until_terminal=True), timeout=PATIENCE
        )
    ]
    assert plain == []
    with_state = [
        r
        async for r in cluster.analysis.WatchStatus(
            apb.WatchStatusRequest(media_ids=ids, until_terminal=True, send_initial_state=True),
            timeout=PATIENCE,
        )
    ]
    assert [r.change.status for r in with_state[:-1]] == [apb.PROCESSING_STATUS_COMPLETED] * 2
    assert with_state[-1].bookmark.initial_state_end


async def test_until_terminal_waits_for_items_not_yet_submitted(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(analyzer=ScriptedAnalyzer(dimensions=64))
    await cluster.start_analysis()
    # Ingest is not running yet: the watched id is unknown to analysis for now.
    call = cluster.analysis.WatchStatus(
        apb.WatchStatusRequest(media_ids=["not-yet"], until_terminal=True), timeout=2
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_watch_ends_with_unavailable_on_shutdown(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = await started_cluster(make_cluster)
    call = cluster.analysis.WatchStatus(apb.WatchStatusRequest())
    await call.wait_for_connection()
    await cluster.stop_analysis()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_invalid_watch_requests_are_refused_with_reason(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = await started_cluster(make_cluster)
    cases = [
        (apb.WatchStatusRequest(until_terminal=True), "MEDIA_IDS_REQUIRED", "media_ids"),
        (apb.WatchStatusRequest(start_revision=-1), "INVALID_REVISION", "start_revision"),
    ]
    for request, reason, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in cluster.analysis.WatchStatus(request):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(caught.value)
        assert info is not None
        assert info.reason == reason, info
        assert [v.field for v in field_violations(caught.value)] == [field]
    # Nothing accepted was disturbed: uploads still complete.
    response = await upload(cluster, image_files(1))
    (media,) = await wait_terminal(cluster, [response.media[0].id])
    assert media.status == ipb.PROCESSING_STATUS_COMPLETED


async def test_a_revision_ahead_of_the_log_is_out_of_range_and_the_mirror_starts_over(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = await started_cluster(make_cluster)
    first = await upload(cluster, image_files(2, first_seed=60))
    await wait_terminal(cluster, [m.id for m in first.media])
    current = await current_revision(cluster)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in cluster.analysis.WatchStatus(
            apb.WatchStatusRequest(start_revision=current + 50), timeout=PATIENCE
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(caught.value)
    assert info is not None
    assert info.reason == "REVISION_AHEAD"
    assert info.metadata["currentRevision"] == str(current)
    assert info.metadata["oldestRevision"] == "1"

    # The analysis database is replaced (restored, or lost and recreated): its revisions
    # start again from 0, below the one ingest's mirror holds. The mirror must start over,
    # or it would skip the new log's first events.
    await cluster.stop_analysis()
    assert cluster.analysis_config is not None
    shutil.rmtree(cluster.analysis_config.data_dir)
    await cluster.start_analysis()
    later = await upload(cluster, image_files(1, first_seed=62))
    (media,) = await wait_terminal(cluster, [later.media[0].id])
    assert media.status == ipb.PROCESSING_STATUS_COMPLETED

    # The items of the lost log are handed to the new one again, analysed there, and
    # mirrored at its revisions (below those they had).
    async def analysed_again() -> bool:
        shown = [
            (await cluster.ingest.GetMedia(ipb.GetMediaRequest(media_id=m.id))).media
            for m in first.media
        ]
        return all(
            m.status == ipb.PROCESSING_STATUS_COMPLETED
            and 0 < m.status_revision <= new_log_revision
            for m in shown
        )

    new_log_revision = await current_revision(cluster) + 20
    await wait_until(analysed_again)
    jobs = await cluster.analysis.ListJobs(apb.ListJobsRequest(page_size=100))
    assert {m.id for m in first.media} <= {job.media_id for job in jobs.jobs}
