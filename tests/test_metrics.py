"""Prometheus metrics: both services in-process, real uploads, real HTTP scrapes of /metrics."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2 as apb
from mediatag.ingest.v1 import ingest_pb2 as ipb
from prometheus_client.parser import text_string_to_metric_families

from analysis_service.config import AnalysisConfig, RateLimitConfig, RetryPolicy
from analysis_service.errors import PermanentAnalyzerError, QuotaExceeded, TransientAnalyzerError
from ingest_service.config import IngestConfig
from tests.conftest import PATIENCE, Cluster, free_port, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.media_samples import jpeg_bytes
from tests.processes import Serve
from tests.test_pipeline import image_files, upload, wait_terminal

INGEST = "mediatag.ingest.v1.IngestService"
ANALYSIS = "mediatag.analysis.v1.AnalysisService"
FAST_LIMITS = {"local": RateLimitConfig(50, 1)}


class Samples:
    """One scrape: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value
        self.names = {name for name, _ in self.values}

    def get(self, name: str, **labels: str) -> float | None:
        return self.values.get((name, frozenset(labels.items())))


def _fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=PATIENCE) as response:
        body: bytes = response.read()
        return body.decode()


async def scrape(port: int) -> Samples:
    return Samples(await asyncio.to_thread(_fetch, port))


async def expect(port: int, name: str, value: float, **labels: str) -> Samples:
    """Scrape until ``name{labels}`` equals ``value`` (values refreshed from the database lag)."""
    last: list[Samples] = []

    async def reached() -> bool:
        last[:] = [await scrape(port)]
        return last[0].get(name, **labels) == value

    try:
        await wait_until(reached)
    except AssertionError:
        seen = last[0].get(name, **labels) if last else None
        raise AssertionError(f"{name}{labels} is {seen}, expected {value}") from None
    return last[0]


def handled(service: str, method: str, code: str, call_type: str = "unary") -> dict[str, str]:
    return {
        "grpc_service": service,
        "grpc_method": method,
        "grpc_type": call_type,
        "grpc_code": code,
    }


def metrics_ports(cluster: Cluster) -> tuple[int, int]:
    assert cluster.ingest_config is not None
    assert cluster.analysis_config is not None
    assert cluster.ingest_config.metrics_port is not None
    assert cluster.analysis_config.metrics_port is not None
    return cluster.ingest_config.metrics_port, cluster.analysis_config.metrics_port


def metered_cluster(
    make_cluster: Callable[..., Cluster],
    analyzer: ScriptedAnalyzer,
    retry: RetryPolicy | None = None,
) -> Cluster:
    return make_cluster(
        analyzer=analyzer,
        analysis_config=AnalysisConfig(
            rate_limits=FAST_LIMITS,
            retry=retry or RetryPolicy(backoff_base=0.1),
            metrics_port=free_port(),
            metrics_refresh_interval=0.05,
        ),
        ingest_config=IngestConfig(metrics_port=free_port(), metrics_refresh_interval=0.05),
    )


async def test_an_upload_is_seen_in_both_services_metrics(
    make_cluster: Callable[..., Cluster],
) -> None:
    analyzer = ScriptedAnalyzer()
    cluster = metered_cluster(make_cluster, analyzer)
    ingest_port, analysis_port = metrics_ports(cluster)

    # Ingest alone: the job waits in the outbox, and the backlog says so.
    await cluster.start_ingest()
    first = await upload(cluster, image_files(1))
    await expect(ingest_port, "mediatag_outbox_backlog", 1)

    async def delivery_failed() -> bool:
        failures = (await scrape(ingest_port)).get("mediatag_outbox_delivery_failures_total")
        return failures is not None and failures >= 1

    await wait_until(delivery_failed)

    await cluster.start_analysis()
    (done,) = await wait_terminal(cluster, [first.media[0].id])
    assert done.status == ipb.PROCESSING_STATUS_COMPLETED

    ingest = await expect(ingest_port, "mediatag_outbox_backlog", 0)
    assert ingest.get("mediatag_outbox_delivered_total") == 1
    assert (
        ingest.get("mediatag_grpc_server_handled_total", **handled(INGEST, "UploadMedia", "OK"))
        == 1
    )
    assert (
        ingest.get(
            "mediatag_grpc_server_handled_total",
            **handled(INGEST, "ReadMediaContents", "OK"),
        )
        == 1
    )

    analysis = await expect(analysis_port, "mediatag_queue_jobs", 1, status="completed")
    assert analysis.get("mediatag_queue_jobs", status="pending") == 0
    assert analysis.get("mediatag_queue_oldest_pending_age_seconds") == 0
    assert (
        analysis.get("mediatag_grpc_server_handled_total", **handled(ANALYSIS, "SubmitJobs", "OK"))
        == 1
    )
    assert analysis.get("mediatag_job_attempt_duration_seconds_count", outcome="completed") == 1
    assert analysis.get("mediatag_job_attempts_count", status="completed") == 1
    assert analysis.get("mediatag_job_attempts_sum", status="completed") == 1
    assert analysis.get("mediatag_analyzer_call_duration_seconds_count", outcome="ok") == 1
    assert analysis.get("mediatag_rate_limit_wait_seconds_count", api="local") == 1
    assert analysis.get("mediatag_cache_misses_total") == 1
    assert analysis.get("mediatag_cache_hits_total") == 0
    assert analysis.get("mediatag_analyzer_info", analyzer="local", version="1.0") == 1
    assert analysis.get("mediatag_workers") == 4

    # Each endpoint serves its own service's registry, though both run in this process.
    assert "mediatag_queue_jobs" not in ingest.names
    assert "mediatag_outbox_backlog" not in analysis.names

    # A refusal is counted with the code the error mapping gave it.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cluster.ingest.GetMedia(ipb.GetMediaRequest(media_id=str(uuid.uuid4())))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    await expect(
        ingest_port,
        "mediatag_grpc_server_handled_total",
        1,
        **handled(INGEST, "GetMedia", "NOT_FOUND"),
    )

    # The same bytes again: a cache hit, no second analyser call.
    again = await upload(cluster, image_files(1), owner="listing-2")
    (reused,) = await wait_terminal(cluster, [again.media[0].id])
    assert reused.reused
    analysis = await expect(analysis_port, "mediatag_cache_hits_total", 1)
    assert analysis.get("mediatag_cache_misses_total") == 1
    assert analysis.get("mediatag_job_attempt_duration_seconds_count", outcome="completed") == 2
    assert analysis.get("mediatag_analyzer_call_duration_seconds_count", outcome="ok") == 1
    assert len(analyzer.calls) == 1
    # Two jobs, each PENDING, PROCESSING, COMPLETED.
    assert analysis.get("mediatag_status_events_published_total") == 6
    assert analysis.get("mediatag_status_revision") == 6

    # Watchers: ingest's status mirror holds one stream; open a second, then close it.
    before = await expect(analysis_port, "mediatag_watchers", 1)
    call = cluster.analysis.WatchStatus(apb.WatchStatusRequest(send_initial_state=True))
    async for message in call:
        if message.HasField("bookmark") and message.bookmark.initial_state_end:
            break
    after = await expect(analysis_port, "mediatag_watchers", 2)

    def sent(samples: Samples, kind: str) -> float:
        return samples.get("mediatag_watch_messages_sent_total", kind=kind) or 0.0

    # The two items' initial state, then the bookmark that ends it.
    assert sent(after, "event") - sent(before, "event") == 2
    assert sent(after, "bookmark") - sent(before, "bookmark") >= 1
    call.cancel()
    await expect(analysis_port, "mediatag_watchers", 1)
    await expect(
        analysis_port,
        "mediatag_grpc_server_handled_total",
        1,
        **handled(ANALYSIS, "WatchStatus", "CANCELLED", "server_stream"),
    )


async def test_analyser_errors_are_counted_by_class_and_attempts_by_outcome(
    make_cluster: Callable[..., Cluster],
) -> None:
    flaky, broken, throttled = (jpeg_bytes(seed=n) for n in (20, 21, 22))

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    analyzer = ScriptedAnalyzer(
        failures={
            sha(flaky): [TransientAnalyzerError("upstream 503")],
            sha(throttled): [QuotaExceeded("429", api="local", retry_after=0.05)],
        },
        fail_always={sha(broken): PermanentAnalyzerError("cannot decode")},
    )
    cluster = metered_cluster(make_cluster, analyzer, RetryPolicy(backoff_base=0.05))
    _, analysis_port = metrics_ports(cluster)
    await cluster.start_analysis()
    await cluster.start_ingest()

    files = [
        ipb.MediaFile(filename=f"{n}.jpg", content=data)
        for n, data in enumerate((flaky, broken, throttled))
    ]
    response = await upload(cluster, files)
    done = await wait_terminal(cluster, [m.id for m in response.media])
    assert [m.status for m in done] == [
        ipb.PROCESSING_STATUS_COMPLETED,
        ipb.PROCESSING_STATUS_FAILED,
        ipb.PROCESSING_STATUS_COMPLETED,
    ]

    analysis = await expect(analysis_port, "mediatag_queue_jobs", 2, status="completed")
    assert analysis.get("mediatag_queue_jobs", status="failed") == 1
    errors = "mediatag_analyzer_errors_total"
    assert analysis.get(errors, api="local", **{"class": "transient"}) == 1
    assert analysis.get(errors, api="local", **{"class": "permanent"}) == 1
    assert analysis.get(errors, api="local", **{"class": "quota"}) == 1
    assert analysis.get("mediatag_quota_errors_total", api="local") == 1
    assert analysis.get("mediatag_analyzer_call_duration_seconds_count", outcome="ok") == 2

    attempts = "mediatag_job_attempt_duration_seconds_count"
    assert analysis.get(attempts, outcome="completed") == 2
    assert analysis.get(attempts, outcome="retry_scheduled") == 1
    assert analysis.get(attempts, outcome="quota_deferred") == 1
    assert analysis.get(attempts, outcome="failed") == 1
    # The flaky job completed on its second attempt; the quota refusal did not count.
    assert analysis.get("mediatag_job_attempts_count", status="completed") == 2
    assert analysis.get("mediatag_job_attempts_sum", status="completed") == 3
    assert analysis.get("mediatag_job_attempts_bucket", status="completed", le="1.0") == 1
    assert analysis.get("mediatag_job_attempts_count", status="failed") == 1
    # Every analyser call waited for the limiter once: 2 + 1 + 2.
    assert analysis.get("mediatag_rate_limit_wait_seconds_count", api="local") == 5


async def test_the_metrics_endpoint_starts_and_stops_with_its_service(
    make_cluster: Callable[..., Cluster],
) -> None:
    port = free_port()
    cluster = make_cluster(analysis_config=AnalysisConfig(metrics_port=port))
    await cluster.start_analysis()
    assert (await scrape(port)).get("mediatag_workers") == 4

    await cluster.stop_analysis()
    with pytest.raises(urllib.error.URLError):
        await scrape(port)

    # The port was freed: a restart serves on it again.
    await cluster.start_analysis()
    assert (await scrape(port)).get("mediatag_queue_paused") == 0


@pytest.mark.e2e
async def test_mediatag_serve_serves_metrics_on_the_ports_it_is_given(tmp_path: Path) -> None:
    ingest_port, analysis_port, ingest_metrics, analysis_metrics = (free_port() for _ in range(4))
    serve = Serve(
        tmp_path / "serve.log",
        "--data-dir",
        str(tmp_path / "data"),
        "--ingest-port",
        str(ingest_port),
        "--analysis-port",
        str(analysis_port),
        "--ingest-metrics-port",
        str(ingest_metrics),
        "--analysis-metrics-port",
        str(analysis_metrics),
    )
    await asyncio.to_thread(serve.start, ingest_port, analysis_port)
    try:
        health = handled("grpc.health.v1.Health", "Check", "OK")
        ingest = await scrape(ingest_metrics)
        analysis = await scrape(analysis_metrics)
        ingest_checks = ingest.get("mediatag_grpc_server_handled_total", **health)
        analysis_checks = analysis.get("mediatag_grpc_server_handled_total", **health)
        # The readiness probes that start() waited for.
        assert ingest_checks is not None
        assert ingest_checks >= 1
        assert analysis_checks is not None
        assert analysis_checks >= 1
        assert ingest.get("mediatag_outbox_delivered_total") == 0
        assert analysis.get("mediatag_workers") == 4
    finally:
        assert await asyncio.to_thread(serve.stop) == 0, serve.output()
