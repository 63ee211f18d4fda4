"""What the ingest domain reports as it works, for whoever measures it.

The outbox forwarder calls an :class:`IngestObserver` as deliveries succeed or fail, the blob
store a :class:`BlobStoreObserver` after each call, the webhook dispatcher a
:class:`WebhookObserver` after each attempt; the service's metrics implement all three,
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


class WebhookObserver(Protocol):
    """Told how each webhook attempt ended; called on the event loop."""

    def webhook_delivered(self, endpoint: str, seconds: float) -> None:
        """``endpoint`` accepted a delivery; the attempt took ``seconds``."""

    def webhook_failed(self, endpoint: str, *, dead: bool) -> None:
        """An attempt failed; ``dead``: it was the last one (the retry period is over)."""


class NoObserver:
    """An :class:`IngestObserver`, :class:`BlobStoreObserver` and :class:`WebhookObserver`
    that ignores everything."""

    def jobs_delivered(self, count: int) -> None:
        pass

    def delivery_failed(self) -> None:
        pass

    def blob_store_call(self, operation: str, seconds: float, failure: str | None) -> None:
        pass

    def webhook_delivered(self, endpoint: str, seconds: float) -> None:
        pass

    def webhook_failed(self, endpoint: str, *, dead: bool) -> None:
        pass
