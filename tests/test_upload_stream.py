"""UploadMediaStream: a header, then chunks, written to disk as they arrive.

The real ingest server runs in-process on a free port with a real SQLite file; the pipeline
test runs both services.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.config import AnalysisConfig, RateLimitConfig
from ingest_service.config import IngestConfig, UploadLimits
from mediatag_common.service_config import MIB
from tests import media_samples as samples
from tests.blob_stores import StoreUnderTest
from tests.conftest import PATIENCE, Cluster, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.ingest_support import (
    OWNER,
    IngestServer,
    assert_refused,
    chunk,
    chunks_of,
    header,
    listed,
    refusal,
    sha256_of,
    stream_with_sync_client,
    upload_stream,
)

MESSAGE = "Uploaded 1 media file(s). {k} image(s) are being analyzed in the background."


@pytest.fixture
async def server(tmp_path: Path, blob_store: StoreUnderTest) -> AsyncIterator[IngestServer]:
    runner = IngestServer(tmp_path / "ingest", store=blob_store)
    yield runner
    await runner.stop()


def resident_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- what a stream stores --------------------------------------------------------------------


async def test_a_streamed_image_is_stored_and_answered_like_upload_media(
    server: IngestServer,
) -> None:
    stub = await server.start()
    content = samples.jpeg_bytes(21, (1600, 1200), quality=95)
    assert len(content) > 3 * 64 * 1024

    response = await upload_stream(
        stub,
        content,
        # The name and declared type lie; the bytes decide.
        filename="notes.txt",
        content_type="text/plain",
        category="Hair",
        context={"style": "fade"},
        priority=4,
        size_bytes=len(content),
        sha256=sha256_of(content).upper(),
    )

    media = response.media
    assert response.message == MESSAGE.format(k=1)
    assert (media.content_type, media.kind, media.status) == (
        "image/jpeg",
        ipb.MEDIA_KIND_IMAGE,
        ipb.PROCESSING_STATUS_PENDING,
    )
    assert (media.width, media.height, media.size_bytes) == (1600, 1200, len(content))
    assert media.sha256 == sha256_of(content)
    assert (media.owner_id, media.filename, media.category, dict(media.context)) == (
        OWNER,
        "notes.txt",
        "Hair",
        {"style": "fade"},
    )
    assert media.priority == 4
    stored = await stub.GetMedia(ipb.GetMediaRequest(media_id=media.id), timeout=PATIENCE)
    assert stored.media == media
    read = stub.ReadMediaContent(ipb.ReadMediaContentRequest(media_id=media.id), timeout=PATIENCE)
    assert b"".join([c.data async for c in read]) == content
    assert server.blob_files() == {server.blob(media.sha256)}
    assert server.incoming_files() == []


@pytest.mark.parametrize(
    ("content", "content_type", "reason"),
    [
        (samples.mp4_bytes(payload_bytes=300_000), "video/mp4", "video"),
        (samples.webm_bytes(payload_bytes=100_000), "video/webm", "video"),
        (samples.animated_gif_bytes(3), "image/gif", "animated"),
    ],
    ids=["mp4", "webm", "animated-gif"],
)
async def test_video_and_animations_stream_in_as_not_applicable(
    server: IngestServer, content: bytes, content_type: str, reason: str
) -> None:
    stub = await server.start()

    response = await upload_stream(stub, content, filename="x.jpg", chunk_size=10_000)

    assert (response.media.content_type, response.media.not_applicable_reason) == (
        content_type,
        reason,
    )
    assert response.media.status == ipb.PROCESSING_STATUS_NOT_APPLICABLE
    assert response.message == MESSAGE.format(k=0)
    assert server.blobs.read(sha256_of(content)) == content


async def test_identical_streamed_content_is_stored_once(server: IngestServer) -> None:
    stub = await server.start()
    content = samples.png_bytes(5)

    first = await upload_stream(stub, content, filename="a.png")
    by_unary = await stub.UploadMedia(
        ipb.UploadMediaRequest(owner_id=OWNER, files=[ipb.MediaFile(content=content)]),
        timeout=PATIENCE,
    )
    second = await upload_stream(stub, content, filename="b.png", chunk_size=1000)

    ids = {first.media.id, by_unary.media[0].id, second.media.id}
    assert len(ids) == 3
    assert server.blob_files() == {server.blob(sha256_of(content))}


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (samples.png_bytes(22), "image/png"),
        (samples.webp_bytes(23), "image/webp"),
        (samples.bmp_bytes(24), "image/bmp"),
        (samples.tiff_bytes(25), "image/tiff"),
        (samples.gif_bytes(26), "image/gif"),
    ],
    ids=["png", "webp", "bmp", "tiff", "gif"],
)
async def test_every_image_format_streams_in(
    server: IngestServer, content: bytes, content_type: str
) -> None:
    stub = await server.start()

    response = await upload_stream(stub, content, chunk_size=7000)

    assert (response.media.content_type, response.media.status) == (
        content_type,
        ipb.PROCESSING_STATUS_PENDING,
    )
    assert (response.media.width, response.media.height) == (320, 240)
    assert server.blobs.read(sha256_of(content)) == content


# -- memory ----------------------------------------------------------------------------------


@dataclass
class GeneratedVideo:
    """An MP4-like file of ``size`` bytes made chunk by chunk, never whole in memory."""

    size: int
    chunk_size: int = 64 * 1024
    sent: int = 0

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256()

    async def messages(self, **header_fields: Any) -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        yield header(**header_fields)
        ftyp = struct.pack(">I", 24) + b"ftypisom" + struct.pack(">I", 512) + b"isomiso2"
        mdat = struct.pack(">I", self.size - len(ftyp)) + b"mdat"
        data = bytearray(ftyp + mdat)
        block = os.urandom(self.chunk_size)
        while self.sent < self.size:
            # Each chunk differs from the last, so nothing can be deduplicated along the way.
            take = min(self.chunk_size - len(data), self.size - self.sent - len(data))
            data += block[:take]
            data[-8:] = self.sent.to_bytes(8, "big")
            piece = bytes(data)
            data = bytearray()
            self.sha256.update(piece)
            self.sent += len(piece)
            yield chunk(piece)


async def test_a_large_stream_goes_to_disk_with_flat_memory(
    tmp_path: Path, blob_store: StoreUnderTest
) -> None:
    size = 64 * MIB
    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(limits=UploadLimits(max_video_bytes=size)),
        store=blob_store,
    )
    try:
        stub = await server.start()
        # Warm up: threads, gRPC's buffers and the allocator's arenas exist before measuring.
        warm = GeneratedVideo(4 * MIB)
        await stub.UploadMediaStream(warm.messages(filename="warm.mp4"), timeout=PATIENCE)
        baseline = resident_bytes()
        peak = baseline
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, resident_bytes())
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        video = GeneratedVideo(size)
        try:
            response = await stub.UploadMediaStream(
                video.messages(filename="big.mp4", size_bytes=size), timeout=120
            )
        finally:
            done.set()
            await sampler

        assert response.media.size_bytes == size == video.sent
        assert response.media.sha256 == video.sha256.hexdigest()
        assert response.media.status == ipb.PROCESSING_STATUS_NOT_APPLICABLE
        assert len(server.blobs.read(response.media.sha256)) == size
        # Client and server share this process, so this bounds both together. They hold a
        # write batch (1 MiB), a few 64 KiB chunks in flight, and HTTP/2 flow-control
        # windows on each side (a few MiB at most); reading the file into memory would
        # cost its 64 MiB.
        # A bucket's client adds its copies of a part on the way out, and its threads'
        # allocator arenas: a few parts' worth, whatever the file's size (a 160 MiB stream
        # to Cloud Storage's emulator grew it as much as this 64 MiB one).
        bound = 16 * MIB if blob_store.scheme == "file" else 32 * MIB
        grew = peak - baseline
        assert grew < bound, f"resident memory grew by {grew / MIB:.1f} MiB"
    finally:
        await server.stop()


# -- refusals --------------------------------------------------------------------------------

JPEG = samples.jpeg_bytes(31)


def _messages(*fields: Any, content: bytes = JPEG) -> list[ipb.UploadMediaStreamRequest]:
    return [header(**dict(fields)), *chunks_of(content, 4096)]


REFUSED_STREAMS: dict[str, tuple[Callable[[], list[ipb.UploadMediaStreamRequest]], str, str]] = {
    "no-messages": (lambda: [], "HEADER_REQUIRED", "header"),
    "chunk-first": (lambda: [chunk(JPEG[:100]), header()], "HEADER_REQUIRED", "header"),
    "empty-first": (
        lambda: [ipb.UploadMediaStreamRequest(), header()],
        "HEADER_REQUIRED",
        "header",
    ),
    "header-twice": (
        lambda: [header(), chunk(JPEG[:100]), header(), chunk(JPEG[100:])],
        "HEADER_REPEATED",
        "header",
    ),
    "no-owner": (lambda: _messages(("owner_id", "")), "OWNER_ID_REQUIRED", "header.owner_id"),
    "bad-owner": (lambda: _messages(("owner_id", "a b")), "INVALID_OWNER_ID", "header.owner_id"),
    "category-too-long": (
        lambda: _messages(("category", "c" * 129)),
        "INVALID_CATEGORY",
        "header.category",
    ),
    "context-too-big": (
        lambda: _messages(("context", {f"k{n}": "v" for n in range(33)})),
        "INVALID_CONTEXT",
        "header.context",
    ),
    "filename-control-character": (
        lambda: _messages(("filename", "a\nb.jpg")),
        "INVALID_FILENAME",
        "header.filename",
    ),
    "malformed-request-id": (
        lambda: _messages(("request_id", "not-a-uuid")),
        "INVALID_REQUEST_ID",
        "header.request_id",
    ),
    "malformed-sha256": (
        lambda: _messages(("sha256", "abc")),
        "INVALID_SHA256",
        "header.sha256",
    ),
    "negative-size": (lambda: _messages(("size_bytes", -1)), "INVALID_SIZE", "header.size_bytes"),
    "declared-size-over-every-limit": (
        lambda: _messages(("size_bytes", 513 * MIB)),
        "FILE_TOO_LARGE",
        "header.size_bytes",
    ),
    "declared-image-size-over-the-image-limit": (
        lambda: _messages(("size_bytes", 21 * MIB)),
        "FILE_TOO_LARGE",
        "header.size_bytes",
    ),
    "empty-file": (lambda: [header(), chunk(b""), chunk(b"")], "EMPTY_FILE", "chunk"),
    "not-media-named-and-declared-jpeg": (
        lambda: _messages(
            ("filename", "photo.jpg"), ("content_type", "image/jpeg"), content=b"%PDF-1.7\n" * 500
        ),
        "UNSUPPORTED_MEDIA_TYPE",
        "chunk",
    ),
    "heif-still-image": (
        lambda: _messages(content=samples.mp4_bytes(brand=b"heic")),
        "UNSUPPORTED_MEDIA_TYPE",
        "chunk",
    ),
    "truncated-jpeg": (
        lambda: _messages(content=samples.truncated_jpeg_bytes(4)),
        "CORRUPT_IMAGE",
        "chunk",
    ),
    "decompression-bomb": (
        lambda: _messages(content=samples.decompression_bomb_png_bytes()),
        "IMAGE_TOO_LARGE",
        "chunk",
    ),
    "checksum-mismatch": (
        lambda: _messages(("sha256", sha256_of(JPEG + b"x"))),
        "CHECKSUM_MISMATCH",
        "header.sha256",
    ),
    "cut-off-before-the-declared-size": (
        lambda: _messages(("size_bytes", len(JPEG) + 1)),
        "SIZE_MISMATCH",
        "header.size_bytes",
    ),
    "more-than-the-declared-size": (
        lambda: _messages(("size_bytes", len(JPEG) - 1)),
        "SIZE_MISMATCH",
        "header.size_bytes",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_STREAMS))
async def test_a_bad_stream_is_refused_and_leaves_nothing(server: IngestServer, case: str) -> None:
    make_messages, reason, field_name = REFUSED_STREAMS[case]
    stub = await server.start()
    await upload_stream(stub, samples.jpeg_bytes(1))
    listed_before = await listed(stub)
    blobs_before = server.blob_files()

    # The refusal may come before every message was sent: see stream_with_sync_client.
    error = await refusal(stream_with_sync_client(server, make_messages(), deadline=PATIENCE))

    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, reason, field_name)
    assert await listed(stub) == listed_before
    assert server.blob_files() == blobs_before
    assert server.incoming_files() == []


@pytest.mark.parametrize(
    ("first", "limits", "limit"),
    [
        (b"\xff\xd8\xff\xe0", UploadLimits(max_image_bytes=1 * MIB), 1 * MIB),
        (samples.mp4_bytes(payload_bytes=64), UploadLimits(max_video_bytes=2 * MIB), 2 * MIB),
    ],
    ids=["image", "video"],
)
async def test_a_stream_over_its_limit_is_refused_without_reading_the_rest(
    tmp_path: Path, first: bytes, limits: UploadLimits, limit: int
) -> None:
    server = IngestServer(tmp_path / "ingest", config=IngestConfig(limits=limits))
    sent = 0

    def endless() -> Iterator[ipb.UploadMediaStreamRequest]:
        nonlocal sent
        yield header(filename="endless")
        yield chunk(first)
        block = bytes(64 * 1024)
        while True:
            sent += len(block)
            yield chunk(block)

    try:
        await server.start()
        error = await refusal(stream_with_sync_client(server, endless()))
        assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "FILE_TOO_LARGE", "chunk")
        # The client got as far as the limit plus what flow control let it buffer, then
        # the call ended: the server stopped reading at the limit.
        assert limit <= sent < limit + 16 * MIB
        assert server.incoming_files() == []
        assert server.blob_files() == set()
    finally:
        await server.stop()


async def test_a_cancelled_stream_leaves_no_blob_no_temp_file_and_no_item(
    server: IngestServer,
) -> None:
    stub = await server.start()
    content = samples.mp4_bytes(payload_bytes=3 * MIB)
    hold = asyncio.Event()

    async def half_then_wait() -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        for message in [header(filename="clip.mp4"), *chunks_of(content[: 2 * MIB])]:
            yield message
        await hold.wait()

    call = stub.UploadMediaStream(half_then_wait(), timeout=PATIENCE)

    async def receiving() -> bool:
        # The first megabyte has been written to the temp file.
        return any(p.stat().st_size >= MIB for p in server.incoming_files())

    await wait_until(receiving)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def cleaned_up() -> bool:
        return server.incoming_files() == []

    await wait_until(cleaned_up)
    assert server.blob_files() == set()
    assert await listed(stub) == []
    # The service goes on as before.
    assert (await upload_stream(stub, content)).media.size_bytes == len(content)


async def test_a_stalled_stream_is_ended_and_its_partial_file_removed(
    tmp_path: Path, blob_store: StoreUnderTest
) -> None:
    server = IngestServer(
        tmp_path / "ingest", config=IngestConfig(stream_idle_timeout=0.3), store=blob_store
    )
    hold = asyncio.Event()

    async def stall() -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        yield header(filename="clip.mp4")
        yield chunk(samples.mp4_bytes())
        await hold.wait()

    try:
        stub = await server.start()
        error = await refusal(stub.UploadMediaStream(stall(), timeout=PATIENCE))
        assert_refused(error, grpc.StatusCode.DEADLINE_EXCEEDED, "UPLOAD_STALLED", None)
        assert server.incoming_files() == []
        assert server.blob_files() == set()
        assert await listed(stub) == []
    finally:
        hold.set()
        await server.stop()


async def test_partial_uploads_left_by_a_crash_are_removed_on_start(server: IngestServer) -> None:
    await server.start()
    await server.stop()
    leftover = server.spool_dir / ".incoming-crashed"
    leftover.write_bytes(b"half a video")

    await server.start()

    assert not leftover.exists()


# -- through the pipeline --------------------------------------------------------------------


async def test_a_streamed_image_is_analysed_to_completion(
    make_cluster: Callable[..., Cluster],
) -> None:
    analyzer = ScriptedAnalyzer()
    cluster = make_cluster(
        analyzer=analyzer,
        analysis_config=AnalysisConfig(rate_limits={"local": RateLimitConfig(50, 1)}),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    stub = cluster.ingest
    image = samples.jpeg_bytes(41, (800, 600))

    uploaded = await upload_stream(stub, image, category="Hair", size_bytes=len(image))
    video = await upload_stream(stub, samples.mp4_bytes(payload_bytes=200_000))

    assert uploaded.media.status == ipb.PROCESSING_STATUS_PENDING
    assert video.media.status == ipb.PROCESSING_STATUS_NOT_APPLICABLE
    done: list[ipb.Media] = []

    async def completed() -> bool:
        response = await stub.GetMedia(
            ipb.GetMediaRequest(media_id=uploaded.media.id), timeout=PATIENCE
        )
        done[:] = [response.media]
        return response.media.status == ipb.PROCESSING_STATUS_COMPLETED

    await wait_until(completed)
    assert done[0].tags
    assert [call.sha256 for call in analyzer.calls] == [sha256_of(image)]
    still = await stub.GetMedia(ipb.GetMediaRequest(media_id=video.media.id), timeout=PATIENCE)
    assert still.media.status == ipb.PROCESSING_STATUS_NOT_APPLICABLE
