"""What one client may make a WatchStatus stream cost, and take of the watcher slots
(issue 12, items 2 and 3)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb

from mediatag_common.grpc_server import channel_options, open_channel
from tests.conftest import free_port
from tests.ingest_support import assert_refused
from tests.processes import Serve, peak_rss_mib, reset_peak_rss, rss_mib
from tests.test_auth import TOKENS, tokens_file

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
    call = watch(request, timeout=60)
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
        call = watch(at_limit, timeout=30)
        first = apb.WatchStatusResponse.FromString(await anext(aiter(call)))
        assert first.bookmark.initial_state_end
        call.cancel()
    finally:
        await channel.close()
        assert serve.stop() == 0
