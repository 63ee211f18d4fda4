"""What the ingest domain reports as it works, for whoever measures it.

The outbox forwarder calls an :class:`IngestObserver` as deliveries succeed or fail, the blob
store a :class:`BlobStoreObserver` after each call; the service's metrics implement both,
and :class:`NoObserver` ignores everything (tests, or the domain embedded without
metrics). The backlog is not reported: whoever measures asks
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


class BlobStoreObserver(Protocol):
    """Told about each call to the blob store; called on the event loop."""

    def blob_store_call(self, operation: str, seconds: float, failure: str | None) -> None:
        """One call (``put``, ``head``, ``upload_part``...) took ``seconds``; ``failure`` is
        the reason it failed with (``STORAGE_UNAVAILABLE``...), None when it succeeded."""


class NoObserver:
    """An :class:`IngestObserver` and :class:`BlobStoreObserver` that ignores everything."""

    def jobs_delivered(self, count: int) -> None:
        pass

    def delivery_failed(self) -> None:
        pass

    def blob_store_call(self, operation: str, seconds: float, failure: str | None) -> None:
        pass
