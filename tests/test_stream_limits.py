"""What UploadMediaStream calls may hold: a slot each (overall and per caller) and time bounded
by a minimum rate, while unary uploads go on (issue 12, item 5)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from ingest_service.config import IngestConfig, StreamLimits
from ingest_service.domain.stream_pace import StreamPace
from ingest_service.errors import UploadStalled, UploadTooSlow
from mediatag_common.grpc_server import open_channel
from tests import media_samples as samples
from tests.conftest import PATIENCE, free_port
from tests.ingest_support import (
    IngestServer,
    assert_refused,
    chunk,
    chunks_of,
    header,
    listed,
    refusal,
    stream_with_sync_client,
)
from tests.test_auth import TOKENS, tokens_file
from tests.test_metrics import INGEST, expect

MB = 1_000_000

# ---- the pace rules, on a clock of our own ----


def _limits(**changes: float) -> StreamLimits:
    defaults = IngestConfig().stream_limits
    return StreamLimits(
        idle_timeout=changes.get("idle_timeout", defaults.idle_timeout),
        min_rate=int(changes.get("min_rate", defaults.min_rate)),
        rate_window=changes.get("rate_window", defaults.rate_window),
        max_streams=defaults.max_streams,
        max_streams_per_caller=defaults.max_streams_per_caller,
    )


def test_a_slow_mobile_upload_meets_the_default_limits() -> None:
    """500 MB of video at 2 Mbit/s (250,000 bytes/s), in 64 KiB chunks: 33 minutes."""
    pace = StreamPace(_limits(), now=0.0)
    clock, sent, size = 0.0, 0, 64 * 1024
    while sent < 500 * MB:
        clock += size / 250_000
        assert pace.deadline() > clock
        pace.received(size, clock)
        sent += size
    assert clock > 30 * 60


def test_a_drip_is_too_slow_and_silence_is_stalled() -> None:
    limits = _limits(idle_timeout=5, min_rate=1024, rate_window=60)
    # A byte every 4 s never trips the idle timeout; the first window's end refuses it.
    pace, refused_at = StreamPace(limits, now=0.0), None
    for tick in range(1, 100):
        try:
            pace.received(1, tick * 4.0)
        except UploadTooSlow:
            refused_at = tick * 4.0
            break
    assert refused_at is not None
    assert 60 <= refused_at < 68
    # Waiting at the deadline: the end of a window short of its quota is too slow...
    pace = StreamPace(limits, now=0.0)
    pace.received(1024 * 59, 2.0)
    assert pace.deadline() == 7.0
    pace.received(1, 6.0)
    assert isinstance(pace.refusal(pace.deadline()), UploadStalled)
    # ...and a window that brought its quota lends nothing to the next one.
    pace = StreamPace(limits, now=0.0)
    pace.received(10 * 1024 * 60, 1.0)
    for second in range(3, 120, 3):
        pace.received(0, float(second))
    assert pace.deadline() == 120.0
    assert isinstance(pace.refusal(120.0), UploadTooSlow)


# ---- through gRPC ----


async def test_a_dripping_stream_is_ended_and_leaves_nothing(tmp_path: Path) -> None:
    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(stream_idle_timeout=5, upload_min_rate=1024, upload_rate_window=0.5),
    )
    stub = await server.start()
    try:
        content = samples.jpeg_bytes(80)
        pieces = [content[offset : offset + 10] for offset in range(0, len(content), 10)]
        sent = 0

        def drip() -> Iterator[ipb.UploadMediaStreamRequest]:
            nonlocal sent
            yield header(filename="drip.jpg")
            # Ten bytes every 0.1 s (100 bytes/s): each well within the idle timeout, far
            # below the minimum rate, and minutes in all.
            for piece in pieces:
                time.sleep(0.1)
                sent += 1
                yield chunk(piece)

        error = await refusal(stream_with_sync_client(server, drip(), deadline=PATIENCE))
        assert_refused(error, grpc.StatusCode.DEADLINE_EXCEEDED, "UPLOAD_TOO_SLOW", None)
        # Ended by the server while the client was still sending.
        assert sent < len(pieces), (sent, len(pieces))
        assert server.incoming_files() == []
        assert await listed(stub) == []
    finally:
        await server.stop()


async def test_streams_are_capped_overall_and_per_caller_and_unary_uploads_go_on(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    started = {
        "grpc_service": INGEST,
        "grpc_method": "UploadMediaStream",
        "grpc_type": "client_stream",
    }
    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(
            tokens_file=tokens_file(tmp_path / "secrets"),
            metrics_port=metrics_port,
            max_upload_streams=2,
            max_upload_streams_per_caller=1,
        ),
    )
    await server.start()
    channels: list[grpc.aio.Channel] = []

    def stub_of(who: str) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        channel = open_channel(f"127.0.0.1:{server.port}", token=TOKENS[who])
        channels.append(channel)
        return ingest_pb2_grpc.IngestServiceStub(channel)

    uploader, admin = stub_of("uploader7"), stub_of("admin")
    finish = asyncio.Event()

    async def held_stream(seed: int) -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        yield header(owner_id="listing-7", filename=f"{seed}.jpg")
        await finish.wait()
        for message in chunks_of(samples.jpeg_bytes(seed)):
            yield message

    async def receiving(count: int) -> None:
        """Until ``count`` streams have started (each took its slot as it started)."""
        await expect(metrics_port, "mediatag_grpc_server_started_total", count, **started)

    try:
        first = uploader.UploadMediaStream(held_stream(81), timeout=PATIENCE)
        await receiving(1)
        error = await refusal(uploader.UploadMediaStream(held_stream(82), timeout=PATIENCE))
        await receiving(2)
        assert_refused(
            error,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_UPLOAD_STREAMS_FOR_CALLER",
            None,
        )
        second = admin.UploadMediaStream(held_stream(83), timeout=PATIENCE)
        await receiving(3)
        error = await refusal(admin.UploadMediaStream(held_stream(84), timeout=PATIENCE))
        assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_UPLOAD_STREAMS", None)

        # Unary uploads are not streams: they go on while every stream slot is taken.
        unary = await uploader.UploadMedia(
            ipb.UploadMediaRequest(
                owner_id="listing-7",
                files=[ipb.MediaFile(filename="u.jpg", content=samples.jpeg_bytes(85))],
            ),
            timeout=PATIENCE,
        )
        # The held streams finish and are stored; their slots are free again.
        finish.set()
        stored = [(await first).media.id, (await second).media.id]
        third = await uploader.UploadMediaStream(held_stream(86), timeout=PATIENCE)
        assert set(await listed(uploader, "listing-7")) == {
            unary.media[0].id,
            *stored,
            third.media.id,
        }
    finally:
        finish.set()
        for channel in channels:
            await channel.close()
        await server.stop()
