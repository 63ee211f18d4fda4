"""What the ingest domain keeps in its database, named by what it is for.

:class:`IngestStore` is the one interface between the domain (uploads, request ids, the
outbox forwarder, the status mirror, the library, the blob sweep) and a database; the SQL
implementation (SQLite and PostgreSQL) lives in ``ingest_service.storage``. Every method is
one transaction, and every method is safe when several ingest processes share one database:
the promises below hold across them, not only within one process.

Failures are the service's own errors: ``StorageUnavailable`` when the database cannot be
used right now, ``StorageConflict`` when concurrent transactions kept refusing a change
(after the store retried it), ``IngestError`` for anything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from ingest_service.domain.models import Media, ProcessingStatus, RequestRecord, StatusUpdate
from ingest_service.domain.webhook_endpoints import WebhookEndpoint


@dataclass(frozen=True)
class NewUpload:
    """The rows of one answered upload: its items, and the record of its request id if any."""

    items: tuple[Media, ...]
    request: RequestRecord | None


@dataclass(frozen=True)
class MirroredChange:
    """A status change for the mirror to apply, and the webhook endpoints that take its status."""

    update: StatusUpdate
    webhooks: Sequence[WebhookEndpoint] = ()


@dataclass(frozen=True)
class OutboxJob:
    """One analysis job waiting in the outbox: its row, and the media it is for."""

    outbox_id: int
    media: Media


@dataclass(frozen=True)
class OutboxClaim:
    """Jobs leased to one forwarder: nobody else is handed them until the lease ends."""

    token: str
    jobs: tuple[OutboxJob, ...]


@dataclass(frozen=True)
class AnalysisState:
    """Where an item stands: its mirrored status, and whether its job still waits in the
    outbox (not yet accepted by the analysis service)."""

    status: ProcessingStatus
    in_outbox: bool


# Removes the blobs of the given SHA-256s from the blob store; those it removed.
RemoveBlobs = Callable[[Collection[str]], Awaitable[set[str]]]


class IngestStore(Protocol):
    """The ingest service's rows: media, the outbox, request ids and the mirror's cursor."""

    # -- uploads and request ids ---------------------------------------------------------

    async def commit_uploads(
        self, uploads: Sequence[NewUpload], *, requests_expire_before: float
    ) -> list[RequestRecord | None]:
        """Commit ``uploads`` in one transaction: their media rows, an outbox row (its
        analysis job) for each item PENDING, and their request records.

        An upload whose request id is already recorded (unexpired: made at
        ``requests_expire_before`` or later), by another process or earlier in ``uploads``,
        stores nothing: its entry in the answer is that record. The others get None. An
        expired record is replaced. Of two processes racing with one id, exactly one stores.
        """

    async def find_request(self, request_id: str, *, not_before: float) -> RequestRecord | None:
        """The record of ``request_id`` if made at ``not_before`` or later."""

    async def purge_requests(self, *, before: float) -> int:
        """Forget the request records made before ``before``; how many were forgotten."""

    # -- reads -----------------------------------------------------------------------------

    async def get_media(self, media_id: str, *, with_embedding: bool) -> Media | None:
        """One item, None if unknown."""

    async def media_in_order(self, media_ids: Sequence[str]) -> list[Media]:
        """The items of ``media_ids`` (embeddings left out) in that order; unknown ids are
        left out."""

    async def media_owners(self, media_ids: Sequence[str]) -> dict[str, str]:
        """The owner of each known item of ``media_ids``."""

    async def list_media(
        self,
        *,
        owner_id: str | None,
        status: ProcessingStatus | None,
        after: tuple[float, str] | None,
        limit: int,
        with_embedding: bool,
    ) -> list[Media]:
        """Items newest first (``created_at``, then ``id``, descending), of one owner or of
        every owner (``owner_id`` None), starting after the key ``(created_at, id)``."""

    async def analysis_states(self, media_ids: Collection[str]) -> dict[str, AnalysisState]:
        """Where each known item of ``media_ids`` stands."""

    # -- the outbox --------------------------------------------------------------------------

    async def claim_jobs(self, limit: int, *, lease: float) -> OutboxClaim:
        """Lease up to ``limit`` of the oldest jobs no live lease holds, for ``lease``
        seconds (on the database's clock). Concurrent claimers never get the same job; a
        job whose claimer vanished is handed out again once its lease ends."""

    async def complete_jobs(self, outbox_ids: Collection[int]) -> None:
        """The analysis service accepted these jobs: remove them from the outbox."""

    async def release_jobs(self, claim: OutboxClaim) -> None:
        """Give back the jobs of ``claim`` that it still holds, for the next claimer."""

    async def outbox_size(self) -> int:
        """The jobs in the outbox, leased or not."""

    # -- the status mirror -------------------------------------------------------------------

    async def mirror_revision(self) -> int:
        """The revision the status mirror resumes from."""

    async def forget_revisions(self) -> None:
        """The analysis service's event log was replaced (restored from a backup, or made
        anew): the revisions applied so far are of a log that is gone, and its revisions
        count again from where the new one is. Every item's revision and the mirror's go back
        to 0, so that the new log's changes apply, from the current state of every item."""

    async def resubmit_unknown(self) -> int:
        """Put back in the outbox the items the analysis service does not know, once the
        current state of every item has been read: those analysed there (not
        NOT_APPLICABLE), at revision 0 (no change of theirs applied) and not in the outbox.
        How many. (An item delivered meanwhile is submitted twice, which changes nothing.)"""

    async def apply_status_changes(
        self,
        changes: Sequence[MirroredChange],
        *,
        revision: int | None,
        quiet_when_unchanged: bool = False,
    ) -> list[bool]:
        """Apply analysis status changes, in order, and advance the mirror's revision to
        ``revision`` (None: leave it), in one transaction. Idempotent by revision: an item
        already at a change's revision or later is left as it is, so mirrors of several
        processes may apply the same stream; the mirror's revision never moves backwards.
        For each change, whether its item changed; when it did, a webhook delivery is
        enqueued in the same transaction for each of the change's endpoints that wants it
        (by the item's owner and the status), so exactly one process enqueues each change;
        it is due at once, and its retry period runs from then on the store's clock (the
        same for every process, whatever their own clocks say). ``quiet_when_unchanged``
        (the current state of every item, read again): a change that leaves its item's status
        and attempt as they were is applied but counts as no change, and enqueues nothing."""

    # -- the blob sweep ----------------------------------------------------------------------

    async def remove_unreferenced(
        self, sha256s: Collection[str], remove: RemoveBlobs, *, open_for: float
    ) -> set[str]:
        """Which of ``sha256s`` ``remove`` removed, having been awaited with those no media
        row names while no media row can commit (in any process): a row naming one of them
        commits either before they were judged (and they are kept) or after ``remove``
        returned. The transaction stays open for ``remove`` at least ``open_for`` seconds."""
