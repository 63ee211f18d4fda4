"""Every Prometheus metric of the ingest service, in the service's own registry.

:class:`IngestMetrics` is the domain's ``IngestObserver``: the outbox forwarder reports its
deliveries to it. The outbox backlog lives in the database: the metrics server's refresh
task reads it on the event loop (``OutboxForwarder.backlog``) and sets the gauge, which is
all a scrape reads.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from mediatag_common.metrics import ServiceMetrics


class IngestMetrics(ServiceMetrics):
    """The ingest service's metrics; ``registry`` is what its ``/metrics`` serves.

    An :class:`~ingest_service.domain.observer.IngestObserver`.
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

    # -- reported by the domain ---------------------------------------------------------

    def jobs_delivered(self, count: int) -> None:
        self.outbox_delivered.inc(count)

    def delivery_failed(self) -> None:
        self.outbox_delivery_failures.inc()
