"""What a client reads when the service fails: no server path, SQL text or exception, while the
log keeps the detail (issue 12, item 6)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2 as ipb

from mediatag_common.errors import error_info
from tests import media_samples as samples
from tests.conftest import PATIENCE, Cluster
from tests.ingest_support import IngestServer, assert_refused, refusal, upload_stream

# What a driver's or the OS's error text carries, and must not reach a client.
LEAKS = ("SELECT", "sqlite", "[SQL", "Errno", "Traceback", "/tmp", "127.0.0.1", "ipv4:")


def assert_says_nothing_of_the_server(error: grpc.RpcError, data_dir: Path) -> None:
    details = error.details() or ""
    for leak in (*LEAKS, str(data_dir)):
        assert leak not in details, details


def _rename_table(database: Path, table: str, to: str) -> None:
    with sqlite3.connect(database) as conn:
        conn.execute(f"ALTER TABLE {table} RENAME TO {to}")


async def test_a_failing_ingest_database_is_unavailable_without_its_sql(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = IngestServer(tmp_path / "ingest")
    stub = await server.start()
    try:
        media = (
            await stub.UploadMedia(
                ipb.UploadMediaRequest(
                    owner_id="listing-7",
                    files=[ipb.MediaFile(filename="a.jpg", content=samples.jpeg_bytes(90))],
                ),
                timeout=PATIENCE,
            )
        ).media[0]
        _rename_table(server.data_dir / "ingest.db", "media", "media_away")
        try:
            error = await refusal(
                stub.GetMedia(ipb.GetMediaRequest(media_id=media.id), timeout=PATIENCE)
            )
        finally:
            _rename_table(server.data_dir / "ingest.db", "media_away", "media")
        assert_refused(error, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", None)
        assert_says_nothing_of_the_server(error, server.data_dir)
        assert "no such table: media" in caplog.text
        # And the service goes on once its database does.
        assert (await stub.GetMedia(ipb.GetMediaRequest(media_id=media.id))).media.id == media.id
    finally:
        await server.stop()


async def test_a_failing_analysis_database_is_unavailable_without_its_sql(
    make_cluster: Callable[..., Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    cluster = make_cluster()
    await cluster.start_analysis()
    assert cluster.analysis_config is not None
    database = cluster.analysis_config.data_dir / "analysis.db"
    _rename_table(database, "jobs", "jobs_away")
    try:
        error = await refusal(
            cluster.analysis.GetJob(apb.GetJobRequest(media_id="m"), timeout=PATIENCE)
        )
    finally:
        _rename_table(database, "jobs_away", "jobs")
    assert_refused(error, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", None)
    assert_says_nothing_of_the_server(error, cluster.analysis_config.data_dir)
    assert "no such table: jobs" in caplog.text


async def test_a_failing_blob_directory_is_unavailable_without_its_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = IngestServer(tmp_path / "ingest")
    stub = await server.start()
    try:
        # Where uploads are spooled is a file now: every spool file fails to open.
        spool = server.spool_dir
        spool.mkdir(parents=True, exist_ok=True)
        spool.rmdir()
        spool.write_bytes(b"")
        error = await refusal(upload_stream(stub, samples.jpeg_bytes(91), filename="b.jpg"))
        assert_refused(error, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", None)
        assert_says_nothing_of_the_server(error, server.data_dir)
        assert str(spool) in caplog.text
    finally:
        await server.stop()


async def test_an_unreachable_analysis_service_is_named_without_its_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = IngestServer(tmp_path / "ingest")
    stub = await server.start()
    try:
        error = await refusal(
            stub.ReprocessMedia(
                ipb.ReprocessMediaRequest(
                    owner_id="listing-7", status=ipb.PROCESSING_STATUS_FAILED
                ),
                timeout=PATIENCE,
            )
        )
        assert_refused(error, grpc.StatusCode.UNAVAILABLE, "ANALYSIS_UNAVAILABLE", None)
        assert_says_nothing_of_the_server(error, server.data_dir)
        assert f"127.0.0.1:{server.analysis_port}" in caplog.text
    finally:
        await server.stop()


async def test_a_refusal_naming_many_ids_names_a_few_and_counts_them(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    await cluster.start_analysis()
    unknown = [str(uuid.uuid4()) for _ in range(1000)]
    # A client with gRPC's default limits: trailers beyond 16 KiB would be refused by it
    # (RESOURCE_EXHAUSTED), and the refusal lost.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.analysis_port}") as channel:
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
        error = await refusal(
            stub.RetryJobs(apb.RetryJobsRequest(media_ids=unknown), timeout=PATIENCE)
        )
    assert_refused(error, grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", "media_ids")
    info = error_info(error)
    assert info is not None
    assert info.metadata["unknownCount"] == "1000"
    details = error.details() or ""
    assert sorted(unknown)[0] in details
    assert "and 995 more" in details
    assert len(details) < 1024
