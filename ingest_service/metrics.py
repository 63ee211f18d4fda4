"""Every Prometheus metric of the ingest service, in the service's own registry.

:class:`IngestMetrics` is the domain's ``IngestObserver`` and ``BlobStoreObserver``: the
outbox forwarder reports its deliveries to it, the blob store each call. The outbox backlog
lives in the database: the metrics server's refresh task reads it on the event loop
(``OutboxForwarder.backlog``) and sets the gauge, which is all a scrape reads.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from mediatag_common.metrics import ServiceMetrics


class IngestMetrics(ServiceMetrics):
    """The ingest service's metrics; ``registry`` is what its ``/metrics`` serves.

    An :class:`~ingest_service.domain.observer.IngestObserver` and
    :class:`~ingest_service.domain.observer.BlobStoreObserver`.
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

    def blob_store_call(self, operation: str, seconds: float, failure: str | None) -> None:
        self.blob_store_call_seconds.labels(operation).observe(seconds)
        if failure is not None:
            self.blob_store_errors.labels(operation, failure).inc()
