"""What one client may make a WatchStatus stream cost, and take of the watcher slots
(issue 12, items 2 and 3)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc

from analysis_service.config import AnalysisConfig, RateLimitConfig, WatchConfig
from analysis_service.domain.hub import StatusHub, WatchFilter
from analysis_service.errors import TooManyWatchers, WatcherTooSlow
from ingest_service.config import IngestConfig
from mediatag_common.callers import Caller
from mediatag_common.errors import error_info
from mediatag_common.grpc_server import channel_options, open_channel
from tests.conftest import PATIENCE, Cluster, free_port
from tests.fakes import ScriptedAnalyzer
from tests.ingest_support import assert_refused
from tests.processes import Serve, peak_rss_mib, reset_peak_rss, rss_mib
from tests.test_auth import TOKENS, Clients, completed, image_upload, tokens_file

MIB = 1024 * 1024
WATCH_STATUS = "/mediatag.analysis.v1.AnalysisService/WatchStatus"
# Ten streams naming a million media ids each (36 MiB requests): the attack of item 2.
HUGE_WATCHES = 10
HUGE_WATCH_IDS = 1_000_000
# The analysis service's request memory (two 64 MiB messages), and what the process may grow
# by while it is full (README, Limits).
REQUEST_MEMORY_MIB = 128
HUGE_WATCHES_BOUND_MIB = 4 * REQUEST_MEMORY_MIB
# --max-watch-media-ids by default.
MAX_WATCH_MEDIA_IDS = 1000


async def _refusal_of_watch(
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes], request: bytes
) -> grpc.aio.AioRpcError:
    call = watch(request, timeout=PATIENCE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value


@pytest.mark.e2e
async def test_huge_watch_filters_are_refused_at_a_bounded_cost(tmp_path: Path) -> None:
    port = free_port()
    serve = Serve(
        tmp_path / "analysis.log",
        "analysis",
        "--data-dir", str(tmp_path / "data"),
        "--analysis-port", str(port),
        "--tokens-file", str(tokens_file(tmp_path / "secrets")),
        "--analysis-metrics-port", "off",
        "--analyzer-processes", "0",
    ).start(port)  # fmt: skip
    channel = open_channel(
        f"127.0.0.1:{port}", options=channel_options(64 * MIB), token=TOKENS["viewer"]
    )
    try:
        assert serve.process is not None
        pid = serve.process.pid
        huge = apb.WatchStatusRequest(
            media_ids=[str(uuid.uuid4()) for _ in range(HUGE_WATCH_IDS)]
        ).SerializeToString()
        watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(WATCH_STATUS)

        before = rss_mib(pid)
        reset_peak_rss(pid)
        errors = await asyncio.gather(
            *(_refusal_of_watch(watch, huge) for _ in range(HUGE_WATCHES))
        )
        during = peak_rss_mib(pid)
        after = rss_mib(pid)
        print(f"RSS {before:.0f} MiB before, {during:.0f} MiB peak, {after:.0f} MiB after")
        for error in errors:
            assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE", None)
        assert during - before < HUGE_WATCHES_BOUND_MIB

        # Small ids, but one more than a watch may name.
        too_many = apb.WatchStatusRequest(
            media_ids=[f"m{i}" for i in range(MAX_WATCH_MEDIA_IDS + 1)]
        ).SerializeToString()
        assert_refused(
            await _refusal_of_watch(watch, too_many),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TOO_MANY_MEDIA_IDS",
            "media_ids",
        )

        # As many as the limit are served: the state of those ids (none known), then live.
        at_limit = apb.WatchStatusRequest(
            media_ids=[str(uuid.uuid4()) for _ in range(MAX_WATCH_MEDIA_IDS)],
            send_initial_state=True,
        ).SerializeToString()
        call = watch(at_limit, timeout=PATIENCE)
        first = apb.WatchStatusResponse.FromString(await anext(aiter(call)))
        assert first.bookmark.initial_state_end
        call.cancel()
    finally:
        await channel.close()
        assert serve.stop() == 0


# ---- watcher slots (item 3) ----


async def _open_watch(
    stub: analysis_pb2_grpc.AnalysisServiceAsyncStub,
) -> grpc.aio.UnaryStreamCall[Any, Any] | grpc.aio.AioRpcError:
    """A watch once the service has registered it (its headers came), or its refusal."""
    call = stub.WatchStatus(apb.WatchStatusRequest())
    try:
        await call.wait_for_connection()
        if call.done():
            await call.read()  # raises the refusal
    except grpc.aio.AioRpcError as error:
        return error
    return call


async def test_one_caller_cannot_take_every_watcher_slot_nor_the_services_theirs(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    path = tokens_file(tmp_path / "secrets")
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(
            rate_limits={"local": RateLimitConfig(100, 10)},
            watch=WatchConfig(max_watchers=4, max_watchers_per_caller=2),
            tokens_file=path,
            service_token=TOKENS["service"],
        ),
        ingest_config=IngestConfig(tokens_file=path, service_token=TOKENS["service"]),
    )
    await cluster.start_analysis()
    clients = Clients(cluster)
    try:
        # An owner-restricted uploader holds its share, and no more.
        uploader = clients.analysis("uploader7")
        held = [await _open_watch(uploader) for _ in range(2)]
        assert not any(isinstance(call, grpc.aio.AioRpcError) for call in held)
        refusal = await _open_watch(uploader)
        assert isinstance(refusal, grpc.aio.AioRpcError)
        assert_refused(
            refusal, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS_FOR_CALLER", None
        )
        info = error_info(refusal)
        assert info is not None
        assert info.metadata["maxWatchersPerCaller"] == "2"

        # Another caller takes the other two: every client slot is taken.
        held += [await _open_watch(clients.analysis("viewer")) for _ in range(2)]
        refusal = await _open_watch(clients.analysis("viewer7"))
        assert isinstance(refusal, grpc.aio.AioRpcError)
        assert_refused(refusal, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS", None)

        # The ingest service's status mirror (role service) still gets its stream: an
        # upload's completion reaches GetMedia.
        await cluster.start_ingest()
        media = (
            await clients.ingest("uploader7").UploadMedia(image_upload("listing-7", 50))
        ).media[0]
        await completed(clients, [media.id])
        for call in held:
            assert not isinstance(call, grpc.aio.AioRpcError)
            call.cancel()
    finally:
        await clients.close()


async def test_a_slot_is_given_back_once_however_its_subscription_leaves() -> None:
    hub = StatusHub(buffer_size=4, max_watchers=3, max_watchers_per_caller=2)
    app, other, ingest = Caller("app"), Caller("other"), Caller("ingest", service=True)
    first, second = hub.subscribe(WatchFilter(), app), hub.subscribe(WatchFilter(), app)
    with pytest.raises(TooManyWatchers) as caught:
        hub.subscribe(WatchFilter(), app)
    assert caught.value.reason == "TOO_MANY_WATCHERS_FOR_CALLER"
    # Ended (cut off) and then closed: one slot back, not two.
    first.end(WatcherTooSlow("behind"))
    first.close()
    third = hub.subscribe(WatchFilter(), app)
    with pytest.raises(TooManyWatchers):
        hub.subscribe(WatchFilter(), app)
    hub.subscribe(WatchFilter(), other)
    with pytest.raises(TooManyWatchers) as caught:
        hub.subscribe(WatchFilter(), other)
    assert caught.value.reason == "TOO_MANY_WATCHERS"
    # The services' slots are their own.
    assert [hub.subscribe(WatchFilter(), ingest) for _ in range(5)]
    for subscription in (second, third):
        subscription.close()
    assert hub.subscribe(WatchFilter(), other) is not None


async def test_media_ids_longer_than_ingest_issues_are_refused_without_echoing_them(
    make_cluster: Callable[..., Cluster],
) -> None:
    # A GetJob of a 100,000-character id was answered RESOURCE_EXHAUSTED: its NOT_FOUND
    # echoed the id in trailers beyond what a client accepts.
    cluster = make_cluster(analyzer=ScriptedAnalyzer())
    await cluster.start_analysis()
    analysis = cluster.analysis
    huge = "x" * 100_000
    too_long = str(uuid.uuid4()) + "x"
    spec = apb.JobSpec(media_id=too_long, owner_id="owner", sha256="a" * 64)
    refused_calls: list[tuple[Any, str]] = [
        (analysis.GetJob(apb.GetJobRequest(media_id=huge)), "media_id"),
        (analysis.GetJob(apb.GetJobRequest(media_id=too_long)), "media_id"),
        (analysis.RetryJobs(apb.RetryJobsRequest(media_ids=["m", huge])), "media_ids[1]"),
        (analysis.SubmitJobs(apb.SubmitJobsRequest(jobs=[spec])), "jobs[0].media_id"),
    ]
    for call, field_name in refused_calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert_refused(
            refused.value, grpc.StatusCode.INVALID_ARGUMENT, "MEDIA_ID_TOO_LONG", field_name
        )
        assert len(refused.value.details() or "") < 200
    watch = analysis.WatchStatus(apb.WatchStatusRequest(media_ids=[too_long]), timeout=PATIENCE)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in watch:
            pass
    assert_refused(
        refused.value, grpc.StatusCode.INVALID_ARGUMENT, "MEDIA_ID_TOO_LONG", "media_ids[0]"
    )
    # An id as long as ingest's, unknown, is not found, named in the refusal (escaped).
    unknown = "\x1b[2J" + str(uuid.uuid4())[4:]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await analysis.GetJob(apb.GetJobRequest(media_id=unknown))
    assert_refused(missing.value, grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", "media_id")
    assert "\\u001b[2J" in (missing.value.details() or "")
