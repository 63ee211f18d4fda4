"""Every Prometheus metric of the ingest service, in the service's own registry.

The outbox backlog lives in the database: the forwarder measures it on the event loop
(``OutboxForwarder.measure_backlog``, run by the metrics server's refresh task) and the
scrape only reads the gauge.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from mediatag_common.metrics import GrpcServerMetrics, new_registry


class IngestMetrics:
    """The ingest service's metrics; ``registry`` is what its ``/metrics`` serves."""

    def __init__(self) -> None:
        self.registry = new_registry()
        registry = self.registry
        self.grpc = GrpcServerMetrics(registry)
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
