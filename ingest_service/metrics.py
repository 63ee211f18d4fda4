"""Every Prometheus metric of the ingest service, in the service's own registry.

:class:`IngestMetrics` is the domain's ``IngestObserver``, ``BlobStoreObserver`` and
``WebhookObserver``: the outbox forwarder reports its deliveries to it, the blob store each
call, the webhook dispatcher each attempt. The outbox and webhook backlogs live in the
database: the metrics server's refresh task reads them on the event loop and sets the
gauges, which is all a scrape reads.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

from mediatag_common.metrics import ServiceMetrics


class IngestMetrics(ServiceMetrics):
    """The ingest service's metrics; ``registry`` is what its ``/metrics`` serves.

    An :class:`~ingest_service.domain.observer.IngestObserver`,
    :class:`~ingest_service.domain.observer.BlobStoreObserver` and
    :class:`~ingest_service.domain.observer.WebhookObserver`.
    """

    def __init__(self) -> None:
        super().__init__()
        registry = self.registry
        self.outbox_backlog = Gauge(
            "mediatag_outbox_backlog",
            "Analysis jobs committed but not yet delivered to the analysis service "
            "(refreshed from the database).",
            registry=registry,
        )
        self.outbox_delivered = Counter(
            "mediatag_outbox_delivered_total",
            "Analysis jobs delivered to the analysis service (SubmitJobs accepted them).",
            registry=registry,
        )
        self.outbox_delivery_failures = Counter(
            "mediatag_outbox_delivery_failures_total",
            "Delivery rounds that failed (the analysis service unreachable or refusing); "
            "each is retried with backoff.",
            registry=registry,
        )

        self.webhook_deliveries = Counter(
            "mediatag_webhook_deliveries_total",
            "Webhook deliveries the endpoint accepted (a 2xx answer), by endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.webhook_attempt_failures = Counter(
            "mediatag_webhook_attempt_failures_total",
            "Webhook attempts that failed (an answer other than 2xx, a timeout, no "
            "connection), by endpoint; each is retried with backoff until the retry period "
            "ends.",
            ["endpoint"],
            registry=registry,
        )
        self.webhook_dead = Counter(
            "mediatag_webhook_dead_total",
            "Webhook deliveries that became dead (failed for the whole retry period), by endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.webhook_attempt_seconds = Histogram(
            "mediatag_webhook_attempt_seconds",
            "Accepted webhook attempts: the time from sending to the endpoint's answer.",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.webhook_backlog = Gauge(
            "mediatag_webhook_backlog",
            "Webhook deliveries by endpoint and state: pending (waiting, retrying or in "
            "flight) or dead (refreshed from the database).",
            ["endpoint", "state"],
            registry=registry,
        )

        self.blob_store_call_seconds = Histogram(
            "mediatag_blob_store_call_seconds",
            "One call to the blob store (a part of a streamed upload, a read, a sweep's "
            "delete...), by operation; failed calls included.",
            ["operation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.blob_store_errors = Counter(
            "mediatag_blob_store_errors_total",
            "Calls to the blob store that failed, by operation and reason "
            "(STORAGE_UNAVAILABLE, STORAGE_FULL, STORAGE_QUOTA_EXCEEDED, "
            "STORAGE_PERMISSION_DENIED).",
            ["operation", "reason"],
            registry=registry,
        )

    # -- reported by the domain ---------------------------------------------------------

    def jobs_delivered(self, count: int) -> None:
        self.outbox_delivered.inc(count)

    def delivery_failed(self) -> None:
        self.outbox_delivery_failures.inc()

    def webhook_delivered(self, endpoint: str, seconds: float) -> None:
        self.webhook_deliveries.labels(endpoint).inc()
        self.webhook_attempt_seconds.labels(endpoint).observe(seconds)

    def webhook_failed(self, endpoint: str, *, dead: bool) -> None:
        self.webhook_attempt_failures.labels(endpoint).inc()
        if dead:
            self.webhook_dead.labels(endpoint).inc()

    def blob_store_call(self, operation: str, seconds: float, failure: str | None) -> None:
        self.blob_store_call_seconds.labels(operation).observe(seconds)
        if failure is not None:
            self.blob_store_errors.labels(operation, failure).inc()

    def webhook_backlog_is(self, counts: Mapping[str, tuple[int, int]]) -> None:
        """Per endpoint, its pending and dead deliveries now (endpoints absent have none)."""
        self.webhook_backlog.clear()
        for endpoint, (pending, dead) in counts.items():
            self.webhook_backlog.labels(endpoint, "pending").set(pending)
            self.webhook_backlog.labels(endpoint, "dead").set(dead)
