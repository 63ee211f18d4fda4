"""End to end: ``mediatag`` as subprocesses, driven through its CLI and gRPC, as a user would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from tests.conftest import PATIENCE, free_port, wait_until
from tests.media_samples import jpeg_bytes, mp4_bytes
from tests.processes import Serve, run_cli, run_json, stop_all, wait_serving

pytestmark = pytest.mark.e2e


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture
def both(tmp_path: Path, ports: tuple[int, int]) -> Iterator[Serve]:
    ingest_port, analysis_port = ports
    serve = Serve(
        tmp_path / "serve.log",
        "--data-dir",
        str(tmp_path / "data"),
        "--ingest-port",
        str(ingest_port),
        "--analysis-port",
        str(analysis_port),
    ).start(ingest_port, analysis_port)
    yield serve
    assert serve.stop() == 0, serve.output()


def test_cli_upload_of_five_images_and_a_video_completes(
    both: Serve, tmp_path: Path, ports: tuple[int, int]
) -> None:
    ingest_port, analysis_port = ports
    targets = ("--ingest", f"127.0.0.1:{ingest_port}", "--analysis", f"127.0.0.1:{analysis_port}")
    files = []
    for n in range(5):
        path = tmp_path / f"haircut-{n}.jpg"
        path.write_bytes(jpeg_bytes(seed=n))
        files.append(str(path))
    video = tmp_path / "clip.mp4"
    video.write_bytes(mp4_bytes())
    files.append(str(video))

    answer = run_json("upload", *files, "--owner", "listing-7", "--category", "Hair", *targets)

    assert answer["count"] == 6
    assert answer["message"] == (
        "Uploaded 6 media file(s). 5 image(s) are being analyzed in the background."
    )
    statuses = [m["status"] for m in answer["media"]]
    assert statuses == ["PROCESSING_STATUS_PENDING"] * 5 + ["PROCESSING_STATUS_NOT_APPLICABLE"]

    # `watch --until-terminal`-style waiting through the CLI: the default rate is 2 calls/s.
    image_ids = [m["id"] for m in answer["media"][:5]]
    watched = run_cli("watch", *image_ids, "--initial", "--until-terminal", *targets)
    assert watched.returncode == 0, watched.stderr

    for media_id in image_ids:
        media = run_json("get", media_id, "--embedding", *targets)["media"]
        assert media["status"] == "PROCESSING_STATUS_COMPLETED", media
        assert media["tags"]
        assert len(media["embedding"]) == 1408
    listed = run_json("ls", "--owner", "listing-7", "--status", "completed", *targets)
    assert {m["id"] for m in listed["media"]} == set(image_ids)


async def _watch_all(
    stub: analysis_pb2_grpc.AnalysisServiceAsyncStub, ids: list[str], start: int
) -> list[apb.WatchStatusResponse]:
    """Every event of ``ids`` since ``start``, reconnecting from the last revision while the
    service is down, until all are terminal."""
    seen: list[apb.WatchStatusResponse] = []
    last = start
    while True:
        try:
            call = stub.WatchStatus(
                apb.WatchStatusRequest(start_revision=last, media_ids=ids, until_terminal=True)
            )
            async for response in call:
                seen.append(response)
                last = response.revision
            return seen
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.1)


async def test_analysis_killed_mid_processing_loses_nothing_and_completes_once(
    tmp_path: Path, ports: tuple[int, int]
) -> None:
    ingest_port, analysis_port = ports
    data = str(tmp_path / "data")
    ingest = Serve(
        tmp_path / "ingest.log",
        "ingest",
        "--data-dir",
        data,
        "--ingest-port",
        str(ingest_port),
        "--analysis-port",
        str(analysis_port),
    ).start(ingest_port)
    analysis_args = (
        "analysis",
        "--data-dir",
        data,
        "--ingest-port",
        str(ingest_port),
        "--analysis-port",
        str(analysis_port),
        "--lease-seconds",
        "2",
    )
    analysis = Serve(tmp_path / "analysis.log", *analysis_args).start(analysis_port)
    ingest_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ingest_port}")
    analysis_channel = grpc.aio.insecure_channel(f"127.0.0.1:{analysis_port}")
    try:
        ingest_stub = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
        analysis_stub = analysis_pb2_grpc.AnalysisServiceStub(analysis_channel)
        start = (await analysis_stub.GetQueueStatus(apb.GetQueueStatusRequest())).current_revision
        files = [
            ipb.MediaFile(filename=f"{n}.jpg", content=jpeg_bytes(seed=200 + n)) for n in range(12)
        ]
        response = await ingest_stub.UploadMedia(
            ipb.UploadMediaRequest(owner_id="o-1", files=files), timeout=PATIENCE
        )
        ids = [m.id for m in response.media]
        watcher = asyncio.create_task(_watch_all(analysis_stub, ids, start))

        async def some_processing() -> bool:
            status = await analysis_stub.GetQueueStatus(apb.GetQueueStatusRequest())
            counts = {c.status: c.count for c in status.counts}
            return counts.get(apb.PROCESSING_STATUS_PROCESSING, 0) >= 2

        await wait_until(some_processing, interval=0.02)
        analysis.kill()
        analysis = Serve(tmp_path / "analysis.log", *analysis_args).start(analysis_port)

        events = await asyncio.wait_for(watcher, timeout=PATIENCE)
        for media_id in ids:
            mine = [e.change for e in events if e.change.media_id == media_id]
            completions = [c for c in mine if c.status == apb.PROCESSING_STATUS_COMPLETED]
            assert len(completions) == 1, mine
            job = (await analysis_stub.GetJob(apb.GetJobRequest(media_id=media_id))).job
            assert job.status == apb.PROCESSING_STATUS_COMPLETED
            assert list(job.result.tags) == list(completions[0].result.tags)
        # Changes strictly in order across the restart; a bookmark (the stream idle for the
        # bookmark interval, as on a loaded machine while the leases expire) may repeat the
        # revision before it, never go back.
        changes = [e.revision for e in events if e.HasField("change")]
        assert changes == sorted(set(changes))
        revisions = [e.revision for e in events]
        assert revisions == sorted(revisions)
        expired = [e.change for e in events if e.change.error.reason == "LEASE_EXPIRED"]
        assert expired, "the kill should have left leased jobs to expire"

        async def mirrored() -> bool:
            for media_id in ids:
                media = (await ingest_stub.GetMedia(ipb.GetMediaRequest(media_id=media_id))).media
                if media.status != ipb.PROCESSING_STATUS_COMPLETED:
                    return False
            return True

        await wait_until(mirrored)
    finally:
        await ingest_channel.close()
        await analysis_channel.close()
        stop_all(analysis, ingest)


def test_a_second_analysis_service_on_one_sqlite_database_exits_and_a_killed_one_leaves_none(
    tmp_path: Path,
) -> None:
    data = str(tmp_path / "data")
    first_port, second_port = free_port(), free_port()

    def analysis(name: str, port: int) -> Serve:
        return Serve(
            tmp_path / f"{name}.log", "analysis", "--data-dir", data, "--analysis-port", str(port)
        )

    first, second, again = (
        analysis("first", first_port),
        analysis("second", second_port),
        analysis("again", second_port),
    )
    try:
        first.start(first_port)
        second.start()
        assert first.process is not None
        assert second.process is not None
        assert second.process.wait(PATIENCE) == 1
        assert (
            f"cannot start: another process (pid {first.process.pid}) serves from the SQLite "
            "database" in second.output()
        )
        wait_serving(first_port, process=first.process)
        # Killed, the first holds nothing: the next one starts on its database.
        first.kill()
        again.start(second_port)
        assert again.stop() == 0, again.output()
    finally:
        stop_all(first, second, again)
