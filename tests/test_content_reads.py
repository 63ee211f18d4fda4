"""Several jobs' bytes in one call: ingest's ReadMediaContents, and the analysis service's
reads through it (streamed with ReadMediaContent where it leaves an item out, or where an
ingest of an older release does not know it)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from analysis_service.domain.models import JobSpec
from analysis_service.errors import PermanentAnalyzerError
from analysis_service.ingest_content import IngestContent
from ingest_service.config import IngestConfig
from ingest_service.domain import library
from mediatag_common.errors import DOMAIN, error_info, field_violations
from mediatag_common.grpc_server import open_channel
from tests import media_samples as samples
from tests.conftest import PATIENCE, wait_until
from tests.ingest_support import IngestServer, assert_refused, refusal
from tests.test_auth import TOKENS, tokens_file

INCLUDED = ipb.MEDIA_CONTENT_STATE_INCLUDED
NOT_FOUND = ipb.MEDIA_CONTENT_STATE_NOT_FOUND
READ_SEPARATELY = ipb.MEDIA_CONTENT_STATE_READ_SEPARATELY


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[IngestServer]:
    runner = IngestServer(tmp_path / "ingest")
    yield runner
    await runner.stop()


async def upload(stub: ingest_pb2_grpc.IngestServiceAsyncStub, *contents: bytes) -> list[ipb.Media]:
    request = ipb.UploadMediaRequest(
        owner_id="owner",
        files=[
            ipb.MediaFile(filename=f"{n}.jpg", content=content)
            for n, content in enumerate(contents)
        ],
    )
    return list((await stub.UploadMedia(request, timeout=PATIENCE)).media)


def job_spec(media: ipb.Media) -> JobSpec:
    return JobSpec(
        media_id=media.id,
        owner_id=media.owner_id,
        sha256=media.sha256,
        size_bytes=media.size_bytes,
        content_type=media.content_type,
        content_ref=media.id,
    )


async def test_small_items_come_in_the_answer_and_the_others_are_left_to_streams(
    ingest: IngestServer,
) -> None:
    stub = await ingest.start()
    small = [samples.jpeg_bytes(n) for n in range(2)]
    large = samples.jpeg_bytes(7, (2400, 1800), quality=97)
    assert len(large) > library.MAX_CONTENTS_BYTES
    first, second, big = await upload(stub, *small, large)

    answer = await stub.ReadMediaContents(
        ipb.ReadMediaContentsRequest(media_ids=[first.id, "nope", big.id, second.id, first.id]),
        timeout=PATIENCE,
    )

    states = [(item.media_id, item.state) for item in answer.contents]
    assert states == [
        (first.id, INCLUDED),
        ("nope", NOT_FOUND),
        (big.id, READ_SEPARATELY),
        (second.id, INCLUDED),
        (first.id, INCLUDED),
    ]
    items = answer.contents
    assert [items[0].data, items[3].data, items[4].data] == [small[0], small[1], small[0]]
    assert (items[2].data, items[2].size_bytes, items[2].sha256) == (
        b"",
        len(large),
        hashlib.sha256(large).hexdigest(),
    )
    assert (items[0].content_type, items[0].sha256) == ("image/jpeg", first.sha256)


async def test_more_ids_than_one_call_takes_are_refused(ingest: IngestServer) -> None:
    stub = await ingest.start()
    ids = [f"id-{n}" for n in range(library.MAX_CONTENT_IDS + 1)]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReadMediaContents(ipb.ReadMediaContentsRequest(media_ids=ids), timeout=PATIENCE)

    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(error)
    assert info is not None
    assert (info.reason, info.domain) == ("TOO_MANY_MEDIA_IDS", DOMAIN)
    assert [v.field for v in field_violations(error)] == ["media_ids"]
    answer = await stub.ReadMediaContents(
        ipb.ReadMediaContentsRequest(media_ids=ids[: library.MAX_CONTENT_IDS]), timeout=PATIENCE
    )
    assert {item.state for item in answer.contents} == {NOT_FOUND}


async def test_the_bytes_held_in_answers_are_bounded_until_each_call_ends(
    ingest: IngestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the bytes of answers the server holds at once, items are left to streams; an
    answer's bytes are given back once its call ends."""
    stub = await ingest.start()
    contents = [samples.jpeg_bytes(n) for n in range(2)]
    first, second = await upload(stub, *contents)
    monkeypatch.setattr(library, "MAX_CONTENTS_BYTES_HELD", first.size_bytes)
    request = ipb.ReadMediaContentsRequest(media_ids=[first.id, second.id])

    async def first_one_included() -> bool:
        answer = await stub.ReadMediaContents(request, timeout=PATIENCE)
        states = [item.state for item in answer.contents]
        assert states in ([INCLUDED, READ_SEPARATELY], [READ_SEPARATELY, READ_SEPARATELY])
        return states[0] == INCLUDED

    # Each call's answer is given back as its call ends: the next one finds the room again.
    for _ in range(3):
        await wait_until(first_one_included)
    # The streams still answer what a full budget leaves out.
    chunks = stub.ReadMediaContent(ipb.ReadMediaContentRequest(media_id=second.id))
    assert b"".join([chunk.data async for chunk in chunks]) == contents[1]


async def test_an_id_named_twice_counts_twice_in_the_answer(
    ingest: IngestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = await ingest.start()
    (media,) = await upload(stub, samples.jpeg_bytes(4))
    monkeypatch.setattr(library, "MAX_CONTENTS_BYTES", 2 * media.size_bytes)

    answer = await stub.ReadMediaContents(
        ipb.ReadMediaContentsRequest(media_ids=[media.id] * 3), timeout=PATIENCE
    )

    assert [item.state for item in answer.contents] == [INCLUDED, INCLUDED, READ_SEPARATELY]


async def test_the_analysis_service_reads_jobs_bytes_together_and_streams_the_large(
    ingest: IngestServer,
) -> None:
    stub = await ingest.start()
    contents = [samples.jpeg_bytes(n) for n in range(5)]
    contents.append(samples.jpeg_bytes(9, (2400, 1800), quality=97))
    specs = [job_spec(media) for media in await upload(stub, *contents)]
    unknown = JobSpec("gone", "owner", "0" * 64, 10, "image/jpeg", "gone")
    reader = IngestContent(f"127.0.0.1:{ingest.port}", timeout=PATIENCE, max_bytes=20 << 20)
    try:
        read = await asyncio.gather(*(reader.read(spec) for spec in specs))
        with pytest.raises(PermanentAnalyzerError) as missing:
            await reader.read(unknown)
    finally:
        await reader.close()

    assert read == contents
    assert missing.value.reason == "CONTENT_NOT_FOUND"


def older_ingest(content: bytes) -> grpc.GenericRpcHandler:
    """An ingest of a release before ReadMediaContents: it streams one item at a time, and
    answers the method it does not know UNIMPLEMENTED (gRPC's own answer)."""

    async def read_media_content(
        request: ipb.ReadMediaContentRequest, context: Any
    ) -> AsyncIterator[ipb.ReadMediaContentResponse]:
        yield ipb.ReadMediaContentResponse(data=content[:100])
        yield ipb.ReadMediaContentResponse(data=content[100:])

    handler = grpc.unary_stream_rpc_method_handler(
        read_media_content,
        request_deserializer=ipb.ReadMediaContentRequest.FromString,
        response_serializer=ipb.ReadMediaContentResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        "mediatag.ingest.v1.IngestService", {"ReadMediaContent": handler}
    )


async def test_an_ingest_of_an_older_release_is_read_with_streams() -> None:
    content = samples.jpeg_bytes(3)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([older_ingest(content)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    spec = JobSpec("m", "owner", hashlib.sha256(content).hexdigest(), len(content), "", "m")
    reader = IngestContent(f"127.0.0.1:{port}", timeout=PATIENCE, max_bytes=1 << 20)
    try:
        assert list(await asyncio.gather(reader.read(spec), reader.read(spec))) == [content] * 2
        assert await reader.read(spec) == content
    finally:
        await reader.close()
        await server.stop(None)


# ---- ReadMediaContent streams: shares of the slots, and clients that take nothing ----

# Far more than the windows of the connection and the stream hold: a read of it stays open
# for as long as its client does not take the chunks.
LARGE_VIDEO = bytes.fromhex("0000001866747970") + b"mp42\0\0\0\0mp42isom" + b"\1" * (24 << 20)


async def _read_server(tmp_path: Path, **settings: Any) -> tuple[IngestServer, ipb.Media]:
    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(tokens_file=tokens_file(tmp_path / "secrets"), **settings),
    )
    await server.start()
    admin = _stub_of(server, "admin", [])
    answer = await admin.UploadMedia(
        ipb.UploadMediaRequest(
            owner_id="listing-7", files=[ipb.MediaFile(filename="big.mp4", content=LARGE_VIDEO)]
        ),
        timeout=PATIENCE,
    )
    return server, answer.media[0]


def _stub_of(
    server: IngestServer, who: str, channels: list[grpc.aio.Channel]
) -> ingest_pb2_grpc.IngestServiceAsyncStub:
    channel = open_channel(f"127.0.0.1:{server.port}", token=TOKENS[who])
    channels.append(channel)
    return ingest_pb2_grpc.IngestServiceStub(channel)


async def _opened(stub: ingest_pb2_grpc.IngestServiceAsyncStub, media_id: str) -> Any:
    """A read whose first chunk has arrived (so it holds its slot), left unread."""
    call = stub.ReadMediaContent(ipb.ReadMediaContentRequest(media_id=media_id), timeout=PATIENCE)
    first = await call.read()
    assert isinstance(first, ipb.ReadMediaContentResponse)
    assert first.sha256
    return call


async def _read_whole(stub: ingest_pb2_grpc.IngestServiceAsyncStub, media_id: str) -> bytes:
    request = ipb.ReadMediaContentRequest(media_id=media_id)
    return b"".join([m.data async for m in stub.ReadMediaContent(request, timeout=PATIENCE)])


def _open_blob_descriptors(server: IngestServer, sha256: str) -> int:
    """Descriptors of this process (the server runs in it) open on the blob of ``sha256``."""
    blob = str(server.blobs.root / server.blob(sha256))
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == blob
    return count


async def test_content_reads_are_capped_overall_and_per_caller_and_services_have_their_own(
    tmp_path: Path,
) -> None:
    server, media = await _read_server(
        tmp_path, max_content_reads=2, max_content_reads_per_caller=1
    )
    channels: list[grpc.aio.Channel] = []
    try:
        uploader = _stub_of(server, "uploader7", channels)
        held = await _opened(uploader, media.id)

        over_share = await refusal(_opened(uploader, media.id))
        assert_refused(
            over_share,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_CONTENT_READS_FOR_CALLER",
            None,
        )
        info = error_info(over_share)
        assert info is not None
        assert info.metadata["maxContentReadsPerCaller"] == "1"

        # Another client still has room; once the clients' slots are all taken, a third is
        # refused, and the analysis service (a service token) still reads.
        viewer_read = await _opened(_stub_of(server, "viewer", channels), media.id)
        over_total = await refusal(_opened(_stub_of(server, "admin", channels), media.id))
        assert_refused(
            over_total, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CONTENT_READS", None
        )
        service = _stub_of(server, "service", channels)
        assert await _read_whole(service, media.id) == LARGE_VIDEO

        # A read that ends gives its slot back.
        held.cancel()
        viewer_read.cancel()
        await wait_until(lambda: _reads_again(uploader, media.id))
    finally:
        for channel in channels:
            await channel.close()
        await server.stop()


async def _reads_again(stub: ingest_pb2_grpc.IngestServiceAsyncStub, media_id: str) -> bool:
    try:
        return await _read_whole(stub, media_id) == LARGE_VIDEO
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False


async def test_a_read_whose_client_takes_nothing_is_ended_and_its_blob_closed(
    tmp_path: Path,
) -> None:
    server, media = await _read_server(
        tmp_path, content_read_idle_timeout=0.5, max_content_reads_per_caller=1
    )
    channels: list[grpc.aio.Channel] = []
    try:
        uploader = _stub_of(server, "uploader7", channels)
        stalled = await _opened(uploader, media.id)
        assert _open_blob_descriptors(server, media.sha256) == 1

        # Ended: its blob is closed and its slot free for the caller's next read.
        async def blob_closed() -> bool:
            return _open_blob_descriptors(server, media.sha256) == 0

        await wait_until(blob_closed)
        await wait_until(lambda: _reads_again(uploader, media.id))

        # The client that comes back reads what was on its way, then the reason.
        with pytest.raises(grpc.RpcError) as ended:
            async for _ in stalled:
                pass
        assert_refused(ended.value, grpc.StatusCode.DEADLINE_EXCEEDED, "CONTENT_READ_STALLED", None)
    finally:
        for channel in channels:
            await channel.close()
        await server.stop()
