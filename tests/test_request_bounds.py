"""Bounds on what calls without a token (health, reflection) and upload streams' chunks may make
a service hold: on a real ingest server, through real channels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from ingest_service.config import IngestConfig
from mediatag_common.grpc_server import health_check_stub, open_channel
from mediatag_common.request_bodies import GRPC_OWN_MAX_REQUEST_BYTES
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
)
from tests.test_auth import TOKENS, tokens_file
from tests.test_metrics import expect

MIB = 1024 * 1024


def _watch(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamCall[Any, Any]:
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return watch(health_pb2.HealthCheckRequest(), timeout=PATIENCE)


async def test_health_and_reflection_requests_over_a_few_kib_are_refused(tmp_path: Path) -> None:
    server = IngestServer(
        tmp_path / "ingest", config=IngestConfig(tokens_file=tokens_file(tmp_path))
    )
    await server.start()
    channel = open_channel(f"127.0.0.1:{server.port}")  # no token
    try:
        check = health_check_stub(channel)
        large = health_pb2.HealthCheckRequest(service="x" * (GRPC_OWN_MAX_REQUEST_BYTES + 1))
        error = await refusal(check(large, timeout=PATIENCE))
        assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE", None)

        info = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        query = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="y" * (GRPC_OWN_MAX_REQUEST_BYTES + 1)
        )
        error = await refusal(_responses(info(iter([query]), timeout=PATIENCE)))
        assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE", None)

        # Ordinary ones are answered as before.
        answer = await check(health_pb2.HealthCheckRequest(), timeout=PATIENCE)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        listing = await _responses(
            info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=PATIENCE)
        )
        assert listing[0].list_services_response.service
    finally:
        await channel.close()
        await server.stop()


async def _responses(call: AsyncIterable[Any]) -> list[Any]:
    return [response async for response in call]


async def test_health_streams_are_bounded_in_all_and_per_peer(tmp_path: Path) -> None:
    metrics_port = free_port()
    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(
            tokens_file=tokens_file(tmp_path),
            metrics_port=metrics_port,
            max_health_streams=3,
            max_health_streams_per_peer=2,
        ),
    )
    await server.start()
    channel = open_channel(f"127.0.0.1:{server.port}")  # no token; every test client is one peer
    watches = []
    try:
        for _ in range(2):
            watches.append(_watch(channel))
            first = await anext(aiter(watches[-1]))
            assert first.status == health_pb2.HealthCheckResponse.SERVING
        error = await refusal(_responses(_watch(channel)))
        assert_refused(
            error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_HEALTH_STREAMS_FOR_PEER", None
        )
        # Health checks are answered all the same.
        answer = await health_check_stub(channel)(health_pb2.HealthCheckRequest(), timeout=PATIENCE)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

        # A stream that ends gives its place back.
        watches.pop().cancel()
        watches.append(_watch(channel))
        await anext(aiter(watches[-1]))
    finally:
        for watch in watches:
            watch.cancel()
        await channel.close()
        await server.stop()

    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(
            tokens_file=tokens_file(tmp_path), max_health_streams=2, max_health_streams_per_peer=2
        ),
    )
    await server.start()
    channel = open_channel(f"127.0.0.1:{server.port}")
    watches = []
    try:
        for _ in range(2):
            watches.append(_watch(channel))
            await anext(aiter(watches[-1]))
        error = await refusal(_responses(_watch(channel)))
        assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_HEALTH_STREAMS", None)
    finally:
        for watch in watches:
            watch.cancel()
        await channel.close()
        await server.stop()


async def test_a_chunk_over_its_bound_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    server = IngestServer(
        tmp_path / "ingest", config=IngestConfig(tokens_file=tokens_file(tmp_path))
    )
    await server.start()
    channel = open_channel(f"127.0.0.1:{server.port}", token=TOKENS["uploader7"])
    try:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        content = samples.jpeg_bytes(1) + b"\0" * (5 * MIB)
        messages = [header(owner_id="listing-7", filename="a.jpg"), chunk(content[: 64 * 1024])]
        messages.append(chunk(content[64 * 1024 :]))  # over the 4 MiB a chunk may have
        error = await refusal(stub.UploadMediaStream(iter(messages), timeout=PATIENCE))
        assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "CHUNK_TOO_LARGE", None)
        assert await listed(stub, "listing-7") == []
        assert server.incoming_files() == []

        # Chunks up to the bound are taken.
        jpeg = samples.jpeg_bytes(2)
        whole = [header(owner_id="listing-7", filename="b.jpg"), *chunks_of(jpeg, 4 * MIB)]
        stored = await stub.UploadMediaStream(iter(whole), timeout=PATIENCE)
        assert await listed(stub, "listing-7") == [stored.media.id]
    finally:
        await channel.close()
        await server.stop()


async def test_a_chunk_takes_request_memory_before_it_is_read(tmp_path: Path) -> None:
    """A stream's next chunk counts in the request memory (as the chunk bound) from before it
    is read: meanwhile another caller's upload waits for the room, and both are stored."""
    metrics_port = free_port()
    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(
            tokens_file=tokens_file(tmp_path),
            metrics_port=metrics_port,
            max_request_bytes_in_flight=4 * MIB,
        ),
    )
    await server.start()
    streamer = open_channel(f"127.0.0.1:{server.port}", token=TOKENS["uploader7"])
    other = open_channel(f"127.0.0.1:{server.port}", token=TOKENS["admin"])
    release = asyncio.Event()
    content = samples.jpeg_bytes(3)
    first, rest = content[:1000], content[1000:]

    async def messages() -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        yield header(owner_id="listing-7", filename="s.jpg")
        yield chunk(first)
        await release.wait()
        for message in chunks_of(rest):
            yield message

    try:
        stream = ingest_pb2_grpc.IngestServiceStub(streamer).UploadMediaStream(
            messages(), timeout=PATIENCE
        )

        # The stream waits for its next chunk with room for it taken: 4 MiB, the chunk bound.
        await expect(metrics_port, "mediatag_request_memory_bytes", 4 * MIB)
        upload = ingest_pb2_grpc.IngestServiceStub(other).UploadMedia(
            ipb.UploadMediaRequest(
                owner_id="listing-8",
                files=[ipb.MediaFile(filename="u.jpg", content=samples.jpeg_bytes(4))],
            ),
            timeout=PATIENCE,
        )
        await expect(metrics_port, "mediatag_requests_waiting", 1)
        assert not upload.done()

        release.set()
        streamed = await stream
        uploaded = await upload
        stub = ingest_pb2_grpc.IngestServiceStub(other)
        assert await listed(stub, "listing-7") == [streamed.media.id]
        assert await listed(stub, "listing-8") == [uploaded.media[0].id]
        await expect(metrics_port, "mediatag_request_memory_bytes", 0)
    finally:
        release.set()
        await streamer.close()
        await other.close()
        await server.stop()
