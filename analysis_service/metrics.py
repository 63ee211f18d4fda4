"""Every Prometheus metric of the analysis service, in the service's own registry.

Instruments (histograms, counters) are updated where things happen: the workers (attempts,
analyser calls), the rate limits (waits), the servicer (watch messages). Values the service
already keeps (watchers, events published, cache hits, quota errors, busy workers) are read
at scrape time by :class:`_LiveValues`; the queue depth comes from the database, refreshed
on the event loop by :meth:`AnalysisMetrics.record_queue_depth`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from analysis_service.domain.models import JobStatus
from mediatag_common.metrics import GrpcServerMetrics, new_registry

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from analysis_service.domain.cache import ResultCache
    from analysis_service.domain.hub import StatusHub
    from analysis_service.domain.limits import RateLimits
    from analysis_service.domain.queue import JobQueue
    from analysis_service.domain.workers import WorkerPool

# Seconds. A cached result takes milliseconds, the local analyser tens to hundreds of them,
# an upstream AI API seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds; 0 for a limiter with room, up to a quota pause (60 s or a Retry-After).
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 7, 10)

# Outcomes of one attempt (label ``outcome`` of the attempt duration).
COMPLETED = "completed"
FAILED = "failed"
RETRY_SCHEDULED = "retry_scheduled"
QUOTA_DEFERRED = "quota_deferred"
CONTENT_DEFERRED = "content_deferred"
LEASE_LOST = "lease_lost"
NOT_RECORDED = "not_recorded"
RELEASED = "released"

# Classes of analyser errors (label ``class``); ``ok`` is the outcome of a call without one.
TRANSIENT = "transient"
PERMANENT = "permanent"
QUOTA = "quota"
INTERNAL = "internal"
OK = "ok"


@dataclass(frozen=True)
class QueueSample:
    """The queue as last read from the database."""

    counts: Mapping[JobStatus, int]
    oldest_pending_submission: float | None


class AnalysisMetrics:
    """The analysis service's metrics; ``registry`` is what its ``/metrics`` serves."""

    def __init__(self) -> None:
        self.registry = new_registry()
        registry = self.registry
        self.grpc = GrpcServerMetrics(registry)
        self.attempt_duration = Histogram(
            "mediatag_job_attempt_duration_seconds",
            "Time from claiming a job to recording the outcome of that attempt.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.job_attempts = Histogram(
            "mediatag_job_attempts",
            "Attempts a job took to reach a terminal status (quota refusals do not count).",
            ["status"],
            buckets=ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.analyzer_call_duration = Histogram(
            "mediatag_analyzer_call_duration_seconds",
            "Time of one analyser call, without its rate-limit waits.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.analyzer_errors = Counter(
            "mediatag_analyzer_errors_total",
            "Analyser calls that failed, by upstream API and class "
            "(transient, permanent, quota, internal).",
            ["api", "class"],
            registry=registry,
        )
        self.rate_limit_wait = Histogram(
            "mediatag_rate_limit_wait_seconds",
            "Time a call to an upstream API waited for its rate limiter (quota pauses included).",
            ["api"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.watch_messages = Counter(
            "mediatag_watch_messages_sent_total",
            "Messages sent on WatchStatus streams, by kind (event, bookmark).",
            ["kind"],
            registry=registry,
        )
        self.analyzer_info = Gauge(
            "mediatag_analyzer_info",
            "The analyser in use (always 1).",
            ["analyzer", "version"],
            registry=registry,
        )
        # Replaced whole by the event loop, read by the scrape thread.
        self.queue_sample: QueueSample | None = None

    # -- updated by the service --------------------------------------------------------

    def attempt_finished(self, outcome: str, seconds: float, attempt: int) -> None:
        """One attempt ended with ``outcome``; a terminal one also records its attempt count."""
        self.attempt_duration.labels(outcome).observe(seconds)
        if outcome in (COMPLETED, FAILED):
            self.job_attempts.labels(outcome).observe(attempt)

    def analyzer_call(self, outcome: str, seconds: float, api: str) -> None:
        """One analyser call ended: ``ok`` or the class of its error, on ``api``."""
        self.analyzer_call_duration.labels(outcome).observe(seconds)
        if outcome != OK:
            self.analyzer_errors.labels(api, outcome).inc()

    def record_queue_depth(
        self, counts: Mapping[JobStatus, int], oldest_pending_submission: float | None
    ) -> None:
        """The queue as just read from the database (called on the event loop)."""
        self.queue_sample = QueueSample(dict(counts), oldest_pending_submission)

    def expose(
        self,
        *,
        queue: JobQueue,
        pool: WorkerPool,
        hub: StatusHub,
        cache: ResultCache,
        limits: RateLimits,
    ) -> None:
        """Serve the values these objects keep themselves, read at scrape time."""
        self.registry.register(_LiveValues(self, queue, pool, hub, cache, limits))


class _LiveValues:
    """Reads, on the scrape thread, numbers the event loop keeps current.

    Only attribute reads and ``len``: nothing here touches asyncio or the database.
    """

    def __init__(
        self,
        metrics: AnalysisMetrics,
        queue: JobQueue,
        pool: WorkerPool,
        hub: StatusHub,
        cache: ResultCache,
        limits: RateLimits,
    ) -> None:
        self._metrics = metrics
        self._queue = queue
        self._pool = pool
        self._hub = hub
        self._cache = cache
        self._limits = limits

    def collect(self) -> Iterable[Metric]:
        sample = self._metrics.queue_sample
        if sample is not None:
            jobs = GaugeMetricFamily(
                "mediatag_queue_jobs",
                "Jobs in the queue by status (refreshed from the database).",
                labels=["status"],
            )
            for status in JobStatus:
                jobs.add_metric([status.value.lower()], sample.counts.get(status, 0))
            yield jobs
            oldest = sample.oldest_pending_submission
            yield GaugeMetricFamily(
                "mediatag_queue_oldest_pending_age_seconds",
                "Age of the oldest PENDING job (0 when none waits).",
                value=max(0.0, time.time() - oldest) if oldest is not None else 0.0,
            )
        yield GaugeMetricFamily(
            "mediatag_queue_paused", "1 while the queue is paused.", value=int(self._queue.paused)
        )
        yield GaugeMetricFamily("mediatag_workers", "Analysis workers.", value=self._pool.size)
        yield GaugeMetricFamily(
            "mediatag_workers_busy", "Workers processing a job now.", value=self._pool.busy
        )
        yield GaugeMetricFamily(
            "mediatag_watchers", "Open WatchStatus streams.", value=self._hub.watcher_count
        )
        yield CounterMetricFamily(
            "mediatag_status_events_published",
            "Status events published to watchers since the service started.",
            value=self._hub.events_published,
        )
        yield GaugeMetricFamily(
            "mediatag_status_revision",
            "Revision of the latest status event.",
            value=self._hub.current_revision,
        )
        yield CounterMetricFamily(
            "mediatag_cache_hits",
            "Jobs completed from a cached result, without an analyser call.",
            value=self._cache.hits,
        )
        yield CounterMetricFamily(
            "mediatag_cache_misses",
            "Jobs that found no cached result and had their content analysed.",
            value=self._cache.misses,
        )
        quota = CounterMetricFamily(
            "mediatag_quota_errors",
            "Quota refusals (RESOURCE_EXHAUSTED / 429) by upstream API.",
            labels=["api"],
        )
        for api, errors in self._limits.quota_error_counts().items():
            quota.add_metric([api], errors)
        yield quota
