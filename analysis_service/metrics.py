"""Every Prometheus metric of the analysis service, in the service's own registry.

:class:`AnalysisMetrics` is the domain's :class:`AnalysisObserver`: the workers report
attempts, analyser calls and rate-limit waits to it, and the servicer counts watch messages.
Values the service keeps anyway (watchers, events published, cache hits, quota errors, busy
workers) are read at scrape time through the plain callables of :class:`Readings`, wired by
the server; the queue depth comes from the database, refreshed on the event loop by
:meth:`AnalysisMetrics.record_queue_depth`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from analysis_service.domain.models import AttemptOutcome, JobStatus
from analysis_service.domain.observer import CallOutcome
from mediatag_common.metrics import ServiceMetrics

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# Seconds. A cached result takes milliseconds, the local analyser tens to hundreds of them,
# an upstream AI API seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds; 0 for a limiter with room, up to a quota pause (60 s or a Retry-After).
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 7, 10)

# Attempts that leave the job terminal also record how many attempts it took.
_TERMINAL_OUTCOMES = (AttemptOutcome.COMPLETED, AttemptOutcome.FAILED)


def _label(outcome: AttemptOutcome | CallOutcome) -> str:
    """An outcome as a label value: its name in lower case (``quota_deferred``, ``ok``)."""
    return outcome.name.lower()


@dataclass(frozen=True)
class QueueSample:
    """The queue as last read from the database."""

    counts: Mapping[JobStatus, int]
    oldest_pending_submission: float | None


@dataclass(frozen=True)
class Readings:
    """Where a scrape reads the numbers the service keeps itself.

    Called on the scrape thread: each must only read attributes (or take a ``len``), never
    touch asyncio or the database.
    """

    queue_paused: Callable[[], bool]
    workers: Callable[[], int]
    workers_busy: Callable[[], int]
    watchers: Callable[[], int]
    events_published: Callable[[], int]
    current_revision: Callable[[], int]
    cache_hits: Callable[[], int]
    cache_misses: Callable[[], int]
    quota_errors: Callable[[], Mapping[str, int]]


class AnalysisMetrics(ServiceMetrics):
    """The analysis service's metrics; ``registry`` is what its ``/metrics`` serves.

    An :class:`~analysis_service.domain.observer.AnalysisObserver`.
    """

    def __init__(self) -> None:
        super().__init__()
        registry = self.registry
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

    # -- reported by the domain ---------------------------------------------------------

    def attempt_ended(self, outcome: AttemptOutcome, seconds: float, attempt: int) -> None:
        label = _label(outcome)
        self.attempt_duration.labels(label).observe(seconds)
        if outcome in _TERMINAL_OUTCOMES:
            self.job_attempts.labels(label).observe(attempt)

    def analyzer_call_ended(self, outcome: CallOutcome, seconds: float, api: str) -> None:
        label = _label(outcome)
        self.analyzer_call_duration.labels(label).observe(seconds)
        if outcome is not CallOutcome.OK:
            self.analyzer_errors.labels(api, label).inc()

    def waited_for_limit(self, api: str, seconds: float) -> None:
        self.rate_limit_wait.labels(api).observe(seconds)

    # -- read from the service ---------------------------------------------------------

    def record_queue_depth(
        self, counts: Mapping[JobStatus, int], oldest_pending_submission: float | None
    ) -> None:
        """The queue as just read from the database (called on the event loop)."""
        self.queue_sample = QueueSample(dict(counts), oldest_pending_submission)

    def expose(self, readings: Readings) -> None:
        """Serve the values the service keeps itself, read at scrape time."""
        self.registry.register(_LiveValues(self, readings))


class _LiveValues:
    """Reads, on the scrape thread, numbers the event loop keeps current.

    Only the readings and the last queue sample: nothing here touches asyncio or the database.
    """

    def __init__(self, metrics: AnalysisMetrics, readings: Readings) -> None:
        self._metrics = metrics
        self._readings = readings

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
        read = self._readings
        yield GaugeMetricFamily(
            "mediatag_queue_paused", "1 while the queue is paused.", value=int(read.queue_paused())
        )
        yield GaugeMetricFamily("mediatag_workers", "Analysis workers.", value=read.workers())
        yield GaugeMetricFamily(
            "mediatag_workers_busy", "Workers processing a job now.", value=read.workers_busy()
        )
        yield GaugeMetricFamily(
            "mediatag_watchers", "Open WatchStatus streams.", value=read.watchers()
        )
        yield CounterMetricFamily(
            "mediatag_status_events_published",
            "Status events published to watchers since the service started.",
            value=read.events_published(),
        )
        yield GaugeMetricFamily(
            "mediatag_status_revision",
            "Revision of the latest status event.",
            value=read.current_revision(),
        )
        yield CounterMetricFamily(
            "mediatag_cache_hits",
            "Jobs completed from a cached result, without an analyser call.",
            value=read.cache_hits(),
        )
        yield CounterMetricFamily(
            "mediatag_cache_misses",
            "Jobs that found no cached result and had their content analysed.",
            value=read.cache_misses(),
        )
        quota = CounterMetricFamily(
            "mediatag_quota_errors",
            "Quota refusals (RESOURCE_EXHAUSTED / 429) by upstream API.",
            labels=["api"],
        )
        for api, errors in read.quota_errors().items():
            quota.add_metric([api], errors)
        yield quota
