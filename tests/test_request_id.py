"""request_id (AIP-155) on UploadMedia and UploadMediaStream: a retry gets the first answer
and stores nothing twice; the same id with other content is refused; ids expire."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.config import AnalysisConfig, RateLimitConfig
from ingest_service.config import IngestConfig
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from mediatag_common.database import Database, sqlite_url
from tests import media_samples as samples
from tests.conftest import PATIENCE, Cluster, DatabaseUrls, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.ingest_support import (
    OWNER,
    IngestServer,
    assert_refused,
    chunk,
    chunks_of,
    database_urls,
    header,
    listed,
    on_each_database,
    refusal,
    sha256_of,
    stream,
    stream_with_sync_client,
    upload_stream,
)

IMAGE = samples.jpeg_bytes(51)
VIDEO = samples.mp4_bytes(51)


@pytest.fixture
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IngestServer]:
    """The ingest service on SQLite, or on each database with ``on_each_database``."""
    urls = database_urls(request, tmp_path / "databases")
    runner = IngestServer(tmp_path / "ingest", config=IngestConfig(database_url=urls.new("ingest")))
    yield runner
    await runner.stop()
    urls.drop()


def upload_request(request_id: str, **changes: Any) -> ipb.UploadMediaRequest:
    """An image and a video with metadata; ``changes`` replace any field."""
    fields: dict[str, Any] = {
        "owner_id": OWNER,
        "category": "Hair",
        "context": {"style": "fade"},
        "priority": 2,
        "request_id": request_id,
        "files": [
            ipb.MediaFile(filename="a.jpg", content_type="image/jpeg", content=IMAGE),
            ipb.MediaFile(filename="b.mp4", content_type="video/mp4", content=VIDEO),
        ],
        **changes,
    }
    return ipb.UploadMediaRequest(**fields)


@on_each_database("server")
async def test_a_retried_upload_gets_the_first_answer_and_stores_nothing_twice(
    server: IngestServer,
) -> None:
    stub = await server.start()
    request_id = str(uuid.uuid4())

    first = await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE)
    blobs = server.blob_files()
    again = await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE)
    # The id is a UUID: its upper-case spelling is the same id.
    upper = await stub.UploadMedia(upload_request(request_id.upper()), timeout=PATIENCE)

    assert again == first == upper
    assert sorted(await listed(stub)) == sorted(m.id for m in first.media)
    assert server.blob_files() == blobs
    assert server.count_rows("media") == 2
    assert server.count_rows("outbox") == 1
    assert server.count_rows("upload_requests") == 1
    # Without an id, the same request is a new upload.
    other = await stub.UploadMedia(upload_request(""), timeout=PATIENCE)
    assert {m.id for m in other.media}.isdisjoint(m.id for m in first.media)


async def test_the_retry_answers_as_the_first_time_even_after_analysis(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(rate_limits={"local": RateLimitConfig(50, 1)}),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    stub = cluster.ingest
    request_id = str(uuid.uuid4())
    first = await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE)
    image_id = first.media[0].id

    async def completed() -> bool:
        response = await stub.GetMedia(ipb.GetMediaRequest(media_id=image_id), timeout=PATIENCE)
        return response.media.status == ipb.PROCESSING_STATUS_COMPLETED

    await wait_until(completed)
    again = await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE)

    assert again == first
    assert again.media[0].status == ipb.PROCESSING_STATUS_PENDING


OTHER_CONTENT: dict[str, dict[str, Any]] = {
    "other-bytes": {"files": [ipb.MediaFile(filename="a.jpg", content=samples.jpeg_bytes(52))]},
    "one-file-less": {
        "files": [ipb.MediaFile(filename="a.jpg", content_type="image/jpeg", content=IMAGE)]
    },
    "other-filename": {
        "files": [
            ipb.MediaFile(filename="c.jpg", content_type="image/jpeg", content=IMAGE),
            ipb.MediaFile(filename="b.mp4", content_type="video/mp4", content=VIDEO),
        ]
    },
    "other-owner": {"owner_id": "listing-8"},
    "other-category": {"category": "Nails"},
    "other-context": {"context": {"style": "bob"}},
    "other-priority": {"priority": 3},
}


@pytest.mark.parametrize("case", list(OTHER_CONTENT))
async def test_the_same_request_id_with_other_content_is_refused(
    server: IngestServer, case: str
) -> None:
    stub = await server.start()
    request_id = str(uuid.uuid4())
    await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE)
    listed_before = await listed(stub)
    blobs_before = server.blob_files()

    error = await refusal(
        stub.UploadMedia(upload_request(request_id, **OTHER_CONTENT[case]), timeout=PATIENCE)
    )

    assert_refused(error, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED", "request_id")
    assert await listed(stub) == listed_before
    assert await listed(stub, "listing-8") == []
    assert server.blob_files() == blobs_before


@pytest.mark.parametrize(
    "request_id",
    [
        "retry-1",
        "0f8fad5b-d9cb-469f-a165-70867728950",  # one digit short
        "0f8fad5bd9cb469fa16570867728950e",  # no hyphens
        "{0f8fad5b-d9cb-469f-a165-70867728950e}",
        "urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e",
        " 0f8fad5b-d9cb-469f-a165-70867728950e",
        "0f8fad5b-d9cb-469f-a165-70867728950g",
    ],
)
async def test_a_malformed_request_id_is_invalid_argument(
    server: IngestServer, request_id: str
) -> None:
    stub = await server.start()

    error = await refusal(stub.UploadMedia(upload_request(request_id), timeout=PATIENCE))

    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ID", "request_id")
    assert server.blob_files() == set()


# -- races -----------------------------------------------------------------------------------


@on_each_database("server")
async def test_concurrent_duplicates_store_once(server: IngestServer) -> None:
    stub = await server.start()
    request_id = str(uuid.uuid4())

    answers = await asyncio.gather(
        *(stub.UploadMedia(upload_request(request_id), timeout=PATIENCE) for _ in range(12))
    )

    assert all(answer == answers[0] for answer in answers)
    assert server.count_rows("media") == 2
    assert server.count_rows("outbox") == 1


@on_each_database("server")
async def test_concurrent_uses_of_one_id_with_different_content_store_one_of_them(
    server: IngestServer,
) -> None:
    stub = await server.start()
    request_id = str(uuid.uuid4())
    requests = [
        upload_request(request_id),
        upload_request(request_id, files=[ipb.MediaFile(content=samples.png_bytes(53))]),
    ]

    results = await asyncio.gather(
        *(stub.UploadMedia(request, timeout=PATIENCE) for request in requests),
        return_exceptions=True,
    )

    answers = [r for r in results if isinstance(r, ipb.UploadMediaResponse)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert (len(answers), len(errors)) == (1, 1), results
    assert_refused(errors[0], grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED", "request_id")
    assert sorted(await listed(stub)) == sorted(m.id for m in answers[0].media)
    assert server.blob_files() == {server.blob(m.sha256) for m in answers[0].media}


async def test_two_ingest_processes_on_one_database_store_a_duplicate_once(
    tmp_path: Path, databases: DatabaseUrls
) -> None:
    # Two services on one database (and one blob directory) race without sharing a process:
    # only the database (the request id's INSERT ... ON CONFLICT) can keep them apart.
    config = IngestConfig(database_url=databases.new("ingest"))
    first = IngestServer(tmp_path / "ingest", config=config)
    second = IngestServer(tmp_path / "ingest", config=config)
    try:
        stubs = [await first.start(), await second.start()]
        for _ in range(5):
            request_id = str(uuid.uuid4())
            answers = await asyncio.gather(
                *(
                    stubs[n % 2].UploadMedia(upload_request(request_id), timeout=PATIENCE)
                    for n in range(6)
                )
            )
            assert all(answer == answers[0] for answer in answers)
        assert first.count_rows("media") == 10
        assert first.count_rows("upload_requests") == 5
    finally:
        await first.stop()
        await second.stop()


# -- retention -------------------------------------------------------------------------------


async def test_request_ids_survive_a_restart(server: IngestServer) -> None:
    stub = await server.start()
    request_id = str(uuid.uuid4())
    first = await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE)

    await server.stop()
    stub = await server.start()

    assert await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE) == first
    assert server.count_rows("media") == 2


async def test_request_ids_are_purged_after_the_retention(tmp_path: Path) -> None:
    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(request_id_retention=0.5, request_id_purge_interval=0.05),
    )
    try:
        stub = await server.start()
        request_id = str(uuid.uuid4())
        first = await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE)
        assert server.count_rows("upload_requests") == 1

        async def purged() -> bool:
            return server.count_rows("upload_requests") == 0

        await wait_until(purged)
        # Forgotten: the id now names a new upload, whatever its content.
        other = upload_request(request_id, category="Nails")
        second = await stub.UploadMedia(other, timeout=PATIENCE)
        assert {m.id for m in second.media}.isdisjoint(m.id for m in first.media)
        assert await stub.UploadMedia(other, timeout=PATIENCE) == second
    finally:
        await server.stop()


async def test_an_expired_request_id_not_yet_purged_counts_as_unused(tmp_path: Path) -> None:
    server = IngestServer(
        tmp_path / "ingest",
        config=IngestConfig(request_id_retention=0.3, request_id_purge_interval=3600),
    )
    try:
        stub = await server.start()
        request_id = str(uuid.uuid4())
        first = await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE)
        expires = time.time() + 0.3

        async def expired() -> bool:
            return time.time() > expires

        await wait_until(expired)
        other = upload_request(request_id, category="Nails")
        second = await stub.UploadMedia(other, timeout=PATIENCE)

        assert {m.id for m in second.media}.isdisjoint(m.id for m in first.media)
        assert server.count_rows("upload_requests") == 1
        assert server.count_rows("media") == 4
    finally:
        await server.stop()


# -- streams ---------------------------------------------------------------------------------


async def test_a_retried_stream_gets_the_first_answer_and_stores_nothing_twice(
    server: IngestServer,
) -> None:
    stub = await server.start()
    request_id = str(uuid.uuid4())
    fields: dict[str, Any] = {"filename": "clip.mp4", "category": "Hair", "request_id": request_id}

    first = await upload_stream(stub, VIDEO, **fields)
    again = await upload_stream(stub, VIDEO, chunk_size=100, **fields)
    other = await refusal(upload_stream(stub, samples.mp4_bytes(52), **fields))
    # An id is one request: the same content through UploadMedia is another request.
    unary = await refusal(
        stub.UploadMedia(
            ipb.UploadMediaRequest(
                owner_id=OWNER,
                category="Hair",
                request_id=request_id,
                files=[ipb.MediaFile(filename="clip.mp4", content=VIDEO)],
            ),
            timeout=PATIENCE,
        )
    )

    assert again == first
    assert_refused(other, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED", "header.request_id")
    assert_refused(unary, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED", "request_id")
    assert await listed(stub) == [first.media.id]
    assert server.blob_files() == {server.blob(sha256_of(VIDEO))}
    assert server.incoming_files() == []


async def test_a_retried_stream_that_declares_its_sha256_is_answered_before_its_content(
    server: IngestServer,
) -> None:
    stub = await server.start()
    request_id = str(uuid.uuid4())
    content = samples.mp4_bytes(payload_bytes=256 * 1024)
    fields: dict[str, Any] = {"request_id": request_id, "sha256": sha256_of(content)}
    first = await stub.UploadMediaStream(
        stream([header(**fields), *chunks_of(content)]), timeout=PATIENCE
    )
    sent = 0

    def retry() -> Iterator[ipb.UploadMediaStreamRequest]:
        # The content would never end: only an answer from the header ends the call.
        nonlocal sent
        yield header(**fields)
        block = bytes(64 * 1024)
        while True:
            sent += len(block)
            yield chunk(block)

    # Answered before the client is done sending: see stream_with_sync_client.
    again = await stream_with_sync_client(server, retry(), deadline=PATIENCE)

    assert again == first
    assert sent < 16 * 1024 * 1024
    assert server.count_rows("media") == 1
    assert server.incoming_files() == []


async def test_a_stream_racing_its_own_retry_stores_once(server: IngestServer) -> None:
    stub = await server.start()
    request_id = str(uuid.uuid4())
    messages = [header(request_id=request_id), *chunks_of(IMAGE, 1000)]

    answers = await asyncio.gather(
        *(stub.UploadMediaStream(stream(messages), timeout=PATIENCE) for _ in range(6))
    )

    assert all(answer == answers[0] for answer in answers)
    assert await listed(stub) == [answers[0].media.id]
    assert server.incoming_files() == []


async def test_a_database_from_before_request_ids_is_migrated_on_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "ingest"
    data_dir.mkdir()
    old = Database(sqlite_url(str(data_dir / "ingest.db")))
    await old.migrate(MIGRATIONS[:1], lock_name=MIGRATIONS_LOCK)
    await old.close()
    server = IngestServer(data_dir)
    try:
        stub = await server.start()
        request_id = str(uuid.uuid4())
        first = await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE)
        assert await stub.UploadMedia(upload_request(request_id), timeout=PATIENCE) == first
        assert server.count_rows("upload_requests") == 1
        assert server.count_rows("schema_migrations") == len(MIGRATIONS)
    finally:
        await server.stop()
