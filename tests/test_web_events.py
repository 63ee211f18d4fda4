"""Server-Sent Events through a plain HTTP client: ids are revisions, ``Last-Event-ID``
resumes exactly, many clients share one upstream watch, a lost revision says reset."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb

from analysis_service.config import WatchConfig
from tests.conftest import PATIENCE, Cluster, wait_until
from tests.test_metrics import scrape
from tests.test_pipeline import upload, wait_terminal
from tests.test_watch_scale import current_revision as log_revision
from tests.test_watch_scale import fast_cluster, small_images, watch_error
from tests.test_web_api import error_info
from tests.web_support import Event, EventStream, Gateways, Web, open_events, web_config
from web_gateway.config import EventsConfig

OWNER = "listing-9"
Seen = tuple[int, str, str]


def seen(event: Event) -> Seen:
    """What a change says: (revision, media id, status); its id is its revision."""
    response = event.json
    assert int(response["revision"]) == event.revision
    change = response["change"]
    return event.revision, change["mediaId"], change["status"]


async def reference(cluster: Cluster, after: int, media_ids: set[str]) -> list[Seen]:
    """What WatchStatus itself sends from ``after`` until every item of ``media_ids`` is
    terminal."""
    terminal = {"PROCESSING_STATUS_COMPLETED", "PROCESSING_STATUS_FAILED"}
    found: list[Seen] = []
    done: set[str] = set()
    # wait_for_ready: after a restart the channel may still be backing off from its refused
    # reconnects; the call waits for it rather than failing at once.
    call = cluster.analysis.WatchStatus(
        apb.WatchStatusRequest(owner_id=OWNER, start_revision=after),
        timeout=PATIENCE,
        wait_for_ready=True,
    )
    async for response in call:
        if not response.HasField("change"):
            continue
        status = apb.ProcessingStatus.Name(response.change.status)
        found.append((response.revision, response.change.media_id, status))
        if status in terminal:
            done.add(response.change.media_id)
        if done >= media_ids:
            call.cancel()
            break
    return found


async def read_until(stream: EventStream, revision: int) -> list[Seen]:
    """The changes a stream sends up to ``revision``."""
    found: list[Seen] = []
    while not found or found[-1][0] < revision:
        (event,) = await stream.changes(1)
        found.append(seen(event))
    return found


@pytest.mark.parametrize("replay_events", [4096, 1], ids=["from-memory", "from-the-log"])
async def test_resume_after_an_analysis_restart_gets_exactly_the_missed_events(
    make_cluster: Callable[..., Cluster], gateways: Gateways, replay_events: int
) -> None:
    # from-the-log: the gateway remembers one event, so the resuming client reads the event
    # log through a watch of its own, then joins the shared one.
    cluster = fast_cluster(make_cluster, WatchConfig(bookmark_interval=0.3))
    await cluster.start_analysis()
    await cluster.start_ingest()
    events = EventsConfig(keepalive_interval=0.2, replay_events=replay_events)
    web = await gateways.start(web_config(cluster, events=events))
    query = f"?owner_id={OWNER}"
    staying = await open_events(web, query)
    leaving = await open_events(web, query)

    first = await upload(cluster, small_images(2, first_seed=10), owner=OWNER)
    first_ids = {m.id for m in first.media}
    completed: set[str] = set()
    while completed != first_ids:
        event = await leaving.next()
        change = event.json.get("change", {})
        if change.get("status") == "PROCESSING_STATUS_COMPLETED":
            completed.add(change["mediaId"])
    # The last id the client saw is what EventSource resumes from.
    last_id = event.id
    assert last_id is not None
    leaving.close()

    await cluster.stop_analysis()
    await cluster.start_analysis()
    second = await upload(cluster, small_images(2, first_seed=20), owner=OWNER)
    second_ids = {m.id for m in second.media}
    await wait_terminal(cluster, list(second_ids))
    expected = await reference(cluster, int(last_id), second_ids)
    assert {media_id for _, media_id, _ in expected} == second_ids

    resumed = await open_events(web, query, **{"Last-Event-ID": last_id})
    assert await read_until(resumed, expected[-1][0]) == expected
    # The client that stayed connected across the restart missed nothing either.
    stayed = [s for s in await read_until(staying, expected[-1][0]) if s[0] > int(last_id)]
    assert stayed == expected
    staying.close()
    resumed.close()


async def test_500_clients_of_one_filter_share_one_upstream_watch(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig(), metrics=True)
    await cluster.start_analysis()
    await cluster.start_ingest()
    assert cluster.analysis_config is not None
    metrics_port = cluster.analysis_config.metrics_port
    assert metrics_port is not None
    web = await gateways.start(web_config(cluster), connector=aiohttp.TCPConnector(limit=0))

    async def watchers() -> float | None:
        return (await scrape(metrics_port)).get("mediatag_watchers")

    # Ingest's status mirror and the gateway's own watch of everything (its throughput).
    async def settled() -> bool:
        return await watchers() == 2

    await wait_until(settled)
    streams = await asyncio.gather(*(open_events(web, f"?owner_id={OWNER}") for _ in range(500)))
    assert web.host.gateway.watches.streams == 501
    assert await watchers() == 3

    answer = await upload(cluster, small_images(1, first_seed=30), owner=OWNER)
    media_id = answer.media[0].id

    async def completed(stream: EventStream) -> list[Seen]:
        found: list[Seen] = []
        while not found or found[-1][2] != "PROCESSING_STATUS_COMPLETED":
            (event,) = await stream.changes(1)
            found.append(seen(event))
        return found

    received = await asyncio.gather(*(completed(s) for s in streams))
    assert all(r == received[0] for r in received)
    assert [(m, s) for _, m, s in received[0]] == [
        (media_id, "PROCESSING_STATUS_PENDING"),
        (media_id, "PROCESSING_STATUS_PROCESSING"),
        (media_id, "PROCESSING_STATUS_COMPLETED"),
    ]
    assert await watchers() == 3
    for stream in streams:
        stream.close()


async def test_a_revision_the_log_no_longer_holds_or_never_held_says_reset(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig(retention_events=2, compaction_interval=0.1))
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster))
    answer = await upload(cluster, small_images(3, first_seed=40), owner=OWNER)
    await wait_terminal(cluster, [m.id for m in answer.media])

    # Until the log has dropped revision 2, the gateway's first watch of this filter would
    # start there, and its replay of what it read would answer every resume after 1 since.
    async def log_compacted() -> bool:
        error = await watch_error(cluster.analysis, apb.WatchStatusRequest(start_revision=2))
        return error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE

    await wait_until(log_compacted)

    async def compacted() -> bool:
        stream = await open_events(web, f"?owner_id={OWNER}", **{"Last-Event-ID": "1"})
        event = await stream.next()
        stream.close()
        return event.event == "reset"

    await wait_until(compacted)
    for query in (f"?owner_id={OWNER}", "?owner_id=someone-else"):
        # A revision from the future: the shared watch exists (first) or is new (second).
        stream = await open_events(web, query, **{"Last-Event-ID": "999999"})
        event = await stream.next()
        assert event.event == "reset"
        status = event.json
        assert status["code"] == 11  # OUT_OF_RANGE
        (info,) = status["details"]
        assert info["reason"] == "REVISION_AHEAD"
        assert int(info["metadata"]["currentRevision"]) > 0
        with pytest.raises(EOFError):
            await stream.next()
        stream.close()


async def streams_open(web: Web, count: int) -> None:
    """Wait until the gateway has ``count`` event streams open, its own included."""

    async def open_now() -> bool:
        return web.host.gateway.watches.streams == count

    await wait_until(open_now)


async def test_event_streams_and_filters_are_bounded_and_freed_on_close(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    # The gateway's own watch of every change (its throughput count) is one of each. The
    # test is one caller: its share is the whole (shares: tests/test_web_watch_rules.py).
    events = EventsConfig(max_streams=3, max_streams_per_caller=3, max_filters=2)
    web = await gateways.start(web_config(cluster, events=events))

    await streams_open(web, 1)
    first = await open_events(web, "?owner_id=a")
    status, answer = await web.json("GET", "/api/v1/events?owner_id=b")
    assert (status, error_info(answer)["reason"]) == (429, "TOO_MANY_FILTERS")
    assert error_info(answer)["metadata"] == {"maxFilters": "2"}
    second = await open_events(web, "?owner_id=a")
    status, answer = await web.json("GET", "/api/v1/events?owner_id=a")
    assert (status, error_info(answer)["reason"]) == (429, "TOO_MANY_EVENT_STREAMS")
    assert error_info(answer)["metadata"] == {"maxStreams": "3"}

    second.close()

    await streams_open(web, 2)
    again = await open_events(web, "?owner_id=a")
    # Nothing was lost for the streams that stayed: both see the next change.
    answer = await upload(cluster, small_images(1, first_seed=50), owner="a")
    for stream in (first, again):
        (event,) = await stream.changes(1)
        assert seen(event)[1:] == (answer.media[0].id, "PROCESSING_STATUS_PENDING")
        stream.close()


async def test_one_caller_is_refused_beyond_its_share_of_the_filters(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    events = EventsConfig(max_filters=4, max_filters_per_caller=2)
    web = await gateways.start(web_config(cluster, events=events))

    # The gateway's own watch of every change is another caller's stream and filter.
    await streams_open(web, 1)
    on_a = await open_events(web, "?owner_id=a")
    on_b = await open_events(web, "?owner_id=b")
    status, answer = await web.json("GET", "/api/v1/events?owner_id=c")
    assert (status, error_info(answer)["reason"]) == (429, "TOO_MANY_FILTERS_FOR_CALLER")
    assert error_info(answer)["metadata"] == {"maxFiltersPerCaller": "2"}
    # More streams on its filters are not more filters; a filter left makes room for another.
    again_on_a = await open_events(web, "?owner_id=a")
    on_b.close()
    await streams_open(web, 3)
    on_c = await open_events(web, "?owner_id=c")

    # The streams that stayed or came lost nothing: each sees its owner's next change.
    for seed, (owner, watching) in enumerate((("a", (on_a, again_on_a)), ("c", (on_c,)))):
        answer = await upload(cluster, small_images(1, first_seed=60 + seed), owner=owner)
        for stream in watching:
            (event,) = await stream.changes(1)
            assert seen(event)[1:] == (answer.media[0].id, "PROCESSING_STATUS_PENDING")
    for stream in (on_a, again_on_a, on_c):
        stream.close()


async def log_compacted_past(cluster: Cluster, revision: int) -> None:
    """Wait until the analysis service's log no longer holds ``revision``."""

    async def compacted() -> bool:
        error = await watch_error(cluster.analysis, apb.WatchStatusRequest(start_revision=revision))
        return error is not None and error.code() == grpc.StatusCode.OUT_OF_RANGE

    await wait_until(compacted)


async def current_revision(web: Web) -> int:
    return int((await web.ok("GET", "/api/v1/queue"))["currentRevision"])


@pytest.mark.parametrize("kept", [True, False], ids=["in-the-log", "compacted"])
async def test_a_stream_from_now_gets_neither_history_nor_a_reset_another_client_asked_for(
    make_cluster: Callable[..., Cluster], gateways: Gateways, kept: bool
) -> None:
    # The first client of a filter resumes from an old revision (which starts the shared
    # watch), another opens it from now at the same moment.
    watch = WatchConfig() if kept else WatchConfig(retention_events=3, compaction_interval=0.1)
    cluster = fast_cluster(make_cluster, watch)
    await cluster.start_analysis()
    await cluster.start_ingest()
    web = await gateways.start(web_config(cluster, events=EventsConfig(keepalive_interval=0.2)))
    answer = await upload(cluster, small_images(3, first_seed=70), owner=OWNER)
    media_ids = {m.id for m in answer.media}
    await wait_terminal(cluster, list(media_ids))
    if not kept:
        await log_compacted_past(cluster, 2)
    current = await current_revision(web)

    query = f"?owner_id={OWNER}"
    resuming, from_now = await asyncio.gather(
        open_events(web, query, **{"Last-Event-ID": "2"}), open_events(web, query)
    )
    if kept:
        expected = [s for s in await reference(cluster, 2, media_ids) if s[0] <= current]
        assert await read_until(resuming, current) == expected
    else:
        assert (await resuming.next()).event == "reset"
    # From now: nothing before it, and no reset, only its keep-alive at the current revision.
    first = await from_now.next()
    assert (first.event, first.revision) == ("bookmark", current)
    later = await upload(cluster, small_images(1, first_seed=79), owner=OWNER)
    (event,) = await from_now.changes(1)
    assert seen(event)[1:] == (later.media[0].id, "PROCESSING_STATUS_PENDING")
    assert event.revision > current
    resuming.close()
    from_now.close()


async def test_a_stream_ended_by_a_reset_is_counted_off_its_caller_once(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig(retention_events=3, compaction_interval=0.1))
    await cluster.start_analysis()
    await cluster.start_ingest()
    events = EventsConfig(max_filters=8, max_filters_per_caller=2)
    web = await gateways.start(web_config(cluster, events=events))
    answer = await upload(cluster, small_images(3, first_seed=80), owner=OWNER)
    await wait_terminal(cluster, [m.id for m in answer.media])
    await log_compacted_past(cluster, 2)

    # The gateway's own watch of every change is one stream.
    await streams_open(web, 1)
    staying = await open_events(web, "?owner_id=a")
    reset = await open_events(web, "?owner_id=a", **{"Last-Event-ID": "2"})
    assert (await reset.next()).event == "reset"
    with pytest.raises(EOFError):
        await reset.next()
    reset.close()
    await streams_open(web, 2)
    # The caller still has its stream on "a": one more filter is its share.
    on_b = await open_events(web, "?owner_id=b")
    # (Its body is not read unless refused: an event stream opened would never end.)
    async with web.client.get(f"{web.url}/api/v1/events?owner_id=c") as response:
        assert response.status == 429
        reason = error_info(await response.json())["reason"]
    assert reason == "TOO_MANY_FILTERS_FOR_CALLER"
    for stream in (staying, on_b):
        stream.close()


async def test_a_client_ahead_of_the_gateways_watch_gets_its_changes_without_catching_up(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    # The analysis service's idle bookmarks never come during the test: a quiet filter's
    # shared watch stays at the revision it started at while the log goes on.
    cluster = fast_cluster(make_cluster, WatchConfig(bookmark_interval=600.0))
    await cluster.start_analysis()
    await cluster.start_ingest()
    events = EventsConfig(keepalive_interval=0.2, max_catch_ups=1)
    web = await gateways.start(web_config(cluster, events=events))
    watching = [await open_events(web, f"?owner_id={owner}") for owner in ("qa", "qb")]
    busy = await upload(cluster, small_images(2, first_seed=90), owner="busy")
    await wait_terminal(cluster, [m.id for m in busy.media])
    # An id from another gateway (or this one before a restart), past this one's watches.
    last_id = str(await current_revision(web))
    resumed_a, resumed_b = [
        await open_events(web, f"?owner_id={owner}", **{"Last-Event-ID": last_id})
        for owner in ("qa", "qb")
    ]
    first = await resumed_a.next()
    assert (first.event, first.id) == ("bookmark", last_id)
    # No catch-up of the quiet "qa" holds the one catch-up slot ("qb"'s change would wait).
    assert not web.host.gateway.watches.catch_up_slots.locked()
    answer = await upload(cluster, small_images(1, first_seed=99), owner="qb")
    # (Bounded as a whole: each keep-alive would restart the bound of one event.)
    async with asyncio.timeout(PATIENCE):
        (event,) = await resumed_b.changes(1)
    assert seen(event)[1:] == (answer.media[0].id, "PROCESSING_STATUS_PENDING")
    for stream in (*watching, resumed_a, resumed_b):
        stream.close()


async def test_clients_resuming_from_before_the_gateways_watch_on_a_quiet_filter_catch_up_at_once(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    # As after a gateway restart: clients come back with ids older than its watches, which
    # the event log has. The analysis service's idle bookmarks never come during the test.
    cluster = fast_cluster(make_cluster, WatchConfig(bookmark_interval=600.0))
    await cluster.start_analysis()
    await cluster.start_ingest()
    early = await upload(cluster, small_images(1, first_seed=90), owner="busy")
    await wait_terminal(cluster, [m.id for m in early.media])
    old_id = str(await log_revision(cluster))
    busy = await upload(cluster, small_images(2, first_seed=91), owner="busy")
    await wait_terminal(cluster, [m.id for m in busy.media])
    events = EventsConfig(keepalive_interval=0.2, max_catch_ups=1)
    web = await gateways.start(web_config(cluster, events=events))
    resumed_a, resumed_b = [
        await open_events(web, f"?owner_id={owner}", **{"Last-Event-ID": old_id})
        for owner in ("qa", "qb")
    ]
    # The catch-up of the quiet "qa" holds the one slot until the analysis service says its
    # replay is over; before, that was its next idle bookmark, and "qb" waited behind it.
    answer = await upload(cluster, small_images(1, first_seed=99), owner="qb")
    async with asyncio.timeout(PATIENCE):
        (event,) = await resumed_b.changes(1)
    assert seen(event)[1:] == (answer.media[0].id, "PROCESSING_STATUS_PENDING")
    for stream in (resumed_a, resumed_b):
        stream.close()
