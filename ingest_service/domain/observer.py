"""What the ingest domain reports as it works, for whoever measures it.

The outbox forwarder calls an :class:`IngestObserver` as deliveries succeed or fail; the
service's metrics implement it, and :class:`NoObserver` ignores everything (tests, or the
domain embedded without metrics). The backlog is not reported: whoever measures asks
:meth:`OutboxForwarder.backlog <ingest_service.domain.outbox.OutboxForwarder.backlog>`.
"""

from __future__ import annotations

from typing import Protocol


class IngestObserver(Protocol):
    """Told what the outbox forwarder did; called on the event loop, and must not block it."""

    def jobs_delivered(self, count: int) -> None:
        """The analysis service accepted ``count`` jobs of the outbox."""

    def delivery_failed(self) -> None:
        """A delivery round failed (analysis unreachable or refusing); it will be retried."""


class NoObserver:
    """An :class:`IngestObserver` that ignores everything."""

    def jobs_delivered(self, count: int) -> None:
        pass

    def delivery_failed(self) -> None:
        pass
