"""Draining on shutdown (what SIGTERM does): health NOT_SERVING, new calls refused, in-flight
uploads complete, in-flight jobs finish within the grace period or go back to PENDING, watch
streams end with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2 as ipb

from analysis_service.config import AnalysisConfig, RateLimitConfig, RetryPolicy
from mediatag_common.grpc_server import ServiceHost
from tests.conftest import PATIENCE, Cluster, free_port, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.media_samples import jpeg_bytes
from tests.processes import Serve
from tests.test_pipeline import image_files, upload, wait_terminal


def slow_cluster(make_cluster: Callable[..., Cluster], analysis_seconds: float) -> Cluster:
    return make_cluster(
        analyzer=ScriptedAnalyzer(delay=analysis_seconds),
        analysis_config=AnalysisConfig(
            workers=2,
            retry=RetryPolicy(max_attempts=1),
            rate_limits={"local": RateLimitConfig(100, 10)},
        ),
    )


async def processing(cluster: Cluster, count: int) -> None:
    async def busy() -> bool:
        status = await cluster.analysis.GetQueueStatus(apb.GetQueueStatusRequest())
        return status.workers_busy == count

    await wait_until(busy)


def health_watch(
    cluster: Cluster, port: int
) -> grpc.aio.UnaryStreamCall[Any, health_pb2.HealthCheckResponse]:
    """``grpc.health.v1.Health/Watch`` of the whole server, as a load balancer holds it."""
    watch = cluster.channel(port).unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    return watch(health_pb2.HealthCheckRequest(), timeout=PATIENCE)


async def next_status(
    health: grpc.aio.UnaryStreamCall[Any, health_pb2.HealthCheckResponse],
) -> int:
    response = await health.read()
    assert isinstance(response, health_pb2.HealthCheckResponse), response
    return int(response.status)


async def stopping(cluster: Cluster, host: ServiceHost | None, grace: float) -> asyncio.Task[None]:
    """Start draining ``host`` the way SIGTERM does; the task ends when it has stopped."""
    assert host is not None
    return asyncio.create_task(host.stop(grace))


async def test_jobs_that_outlast_the_grace_period_go_back_to_pending_and_streams_end(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = slow_cluster(make_cluster, analysis_seconds=30)
    await cluster.start_analysis()
    await cluster.start_ingest()
    ids = [m.id for m in (await upload(cluster, image_files(2, first_seed=500))).media]
    await processing(cluster, 2)
    watch = cluster.analysis.WatchStatus(apb.WatchStatusRequest())
    await watch.wait_for_connection()
    health = health_watch(cluster, cluster.analysis_port)
    assert await next_status(health) == health_pb2.HealthCheckResponse.SERVING

    stop = await stopping(cluster, cluster.analysis_host, grace=1.0)
    # Health flips at once, while the jobs still hold their workers; new calls (a health
    # check among them) are refused, so a balancer watching health sees the flip.
    assert await next_status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for _ in watch:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.wait_for(stop, timeout=PATIENCE)
    cluster.analysis_host = None

    # Back with a fast analyser: released attempts did not count (max_attempts is 1).
    cluster.analyzer = ScriptedAnalyzer()
    await cluster.start_analysis()
    done = await wait_terminal(cluster, ids)
    assert [m.status for m in done] == [ipb.PROCESSING_STATUS_COMPLETED] * 2
    for media_id in ids:
        job = (await cluster.analysis.GetJob(apb.GetJobRequest(media_id=media_id))).job
        assert [a.outcome for a in job.attempts] == ["RELEASED", "COMPLETED"]
        assert job.attempt == 1


async def test_jobs_that_finish_within_the_grace_period_complete(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = slow_cluster(make_cluster, analysis_seconds=1.0)
    await cluster.start_analysis()
    await cluster.start_ingest()
    ids = [m.id for m in (await upload(cluster, image_files(2, first_seed=510))).media]
    await processing(cluster, 2)

    stop = await stopping(cluster, cluster.analysis_host, grace=10.0)
    await asyncio.wait_for(stop, timeout=PATIENCE)
    cluster.analysis_host = None
    await cluster.start_analysis()
    for media_id in ids:
        job = (await cluster.analysis.GetJob(apb.GetJobRequest(media_id=media_id))).job
        assert job.status == apb.PROCESSING_STATUS_COMPLETED
        assert [a.outcome for a in job.attempts] == ["COMPLETED"]


async def test_an_upload_in_flight_completes_and_new_ones_are_refused(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    await cluster.start_analysis()
    await cluster.start_ingest()
    # Large enough that its first half (over 1 MiB, a write batch) reaches the spool file.
    content = jpeg_bytes(seed=520, size=(3000, 2000), quality=95)
    half = len(content) // 2
    may_finish = asyncio.Event()

    async def slow_stream() -> AsyncIterator[ipb.UploadMediaStreamRequest]:
        yield ipb.UploadMediaStreamRequest(
            header=ipb.UploadHeader(owner_id="drain", filename="slow.jpg", size_bytes=len(content))
        )
        for start in range(0, half, 64 * 1024):
            yield ipb.UploadMediaStreamRequest(chunk=content[start : min(start + 64 * 1024, half)])
        await may_finish.wait()
        yield ipb.UploadMediaStreamRequest(chunk=content[half:])

    async def send() -> ipb.UploadMediaStreamResponse:
        response: ipb.UploadMediaStreamResponse = await cluster.ingest.UploadMediaStream(
            slow_stream(), timeout=PATIENCE
        )
        return response

    in_flight = asyncio.create_task(send())

    async def receiving() -> bool:
        incoming = cluster.root / "ingest" / "blobs" / "incoming"
        return any(incoming.iterdir())

    await wait_until(receiving)
    health = health_watch(cluster, cluster.ingest_port)
    assert await next_status(health) == health_pb2.HealthCheckResponse.SERVING
    stop = await stopping(cluster, cluster.ingest_host, grace=10.0)
    assert await next_status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await upload(cluster, image_files(1, first_seed=521))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    may_finish.set()
    response = await asyncio.wait_for(in_flight, timeout=PATIENCE)
    assert response.media.sha256 == hashlib.sha256(content).hexdigest()
    await asyncio.wait_for(stop, timeout=PATIENCE)
    cluster.ingest_host = None

    # It was stored and handed to analysis: it completes after the restart.
    await cluster.start_ingest()
    # This process's connections to the stopped ingest back off before reconnecting.
    await cluster.ingest.GetMedia(
        ipb.GetMediaRequest(media_id=response.media.id), timeout=PATIENCE, wait_for_ready=True
    )
    (media,) = await wait_terminal(cluster, [response.media.id])
    assert media.status == ipb.PROCESSING_STATUS_COMPLETED


async def test_sigterm_drains_mediatag_serve(tmp_path: Path) -> None:
    """The same drain, started by SIGTERM on ``mediatag serve`` as an operator sends it."""
    ingest_port, analysis_port = free_port(), free_port()
    serve = Serve(
        tmp_path / "serve.log",
        "--data-dir",
        str(tmp_path / "data"),
        "--ingest-port",
        str(ingest_port),
        "--analysis-port",
        str(analysis_port),
        "--grace-period",
        "5",
    ).start(ingest_port, analysis_port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{analysis_port}") as channel:
        health_call = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(), timeout=PATIENCE)
        assert await next_status(health_call) == health_pb2.HealthCheckResponse.SERVING
        watch = analysis_pb2_grpc.AnalysisServiceStub(channel).WatchStatus(
            apb.WatchStatusRequest(), timeout=PATIENCE
        )
        await watch.wait_for_connection()

        assert serve.process is not None
        serve.process.send_signal(signal.SIGTERM)
        assert await next_status(health_call) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in watch:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await asyncio.to_thread(serve.process.wait, PATIENCE) == 0, serve.output()
