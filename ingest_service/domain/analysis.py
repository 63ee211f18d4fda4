"""The analysis service as ingest's domain sees it: where jobs go, and where statuses come from.

:class:`AnalysisService` is the one interface between the domain (the outbox forwarder, the
status mirror, the library's reprocessing) and the analysis service; its gRPC implementation,
which owns the stub, the protobuf conversion and what each status code means here, is
``ingest_service.api.analysis_client``. Only domain objects cross it.

Failures are errors ingest's clients can be given as they are: ``AnalysisUnavailable`` when
the analysis service is down, restarting or overloaded (try again later), and a refusal of
the analysis service as the ingest error it means (``MediaNotFound``, ``InvalidArgument``,
``PermissionDenied``, ``Unauthenticated``, otherwise ``AnalysisRefused`` with its reason).
Each carries the failed call's status code and details in its cause, for the log (clients
never read them: they may name the service's address). A watch may also end with
:class:`ResyncNeeded`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ingest_service.domain.models import Media, ProcessingStatus, StatusUpdate

# How long a call other than a watch may take before it fails with ``AnalysisUnavailable``.
CALL_TIMEOUT = 10.0


@dataclass(frozen=True)
class StatusBookmark:
    """The watch has delivered every change up to ``revision`` (none of them for this
    watcher, or the end of the initial state when ``initial_state_end``)."""

    revision: int
    initial_state_end: bool = False


@dataclass(frozen=True)
class UnknownStatusChange:
    """A change to a status this version does not know (sent by a newer analysis service)."""

    revision: int
    media_id: str
    status: int


StatusEvent = StatusUpdate | UnknownStatusChange | StatusBookmark


class ResyncNeeded(Exception):
    """A watch cannot resume from its revision: the analysis service's event log no longer
    holds it (compacted), or is not the one it came from (a revision ahead of the log:
    ``log_replaced``, the analysis database restored from a backup or made anew). The
    watcher starts over from the current state of every item."""

    def __init__(self, reason: str, *, log_replaced: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_replaced = log_replaced


class AnalysisService(Protocol):
    """The analysis service's job queue and status stream."""

    async def submit_jobs(self, media: Sequence[Media]) -> int:
        """Queue a job for each of ``media`` (idempotent by media id: a job already known
        is left as it is); returns how many were already known."""

    async def retry_jobs(
        self,
        media_ids: Sequence[str],
        *,
        owner_id: str,
        status: ProcessingStatus | None,
    ) -> tuple[str, ...]:
        """Send terminal jobs back to ``PENDING``: those of ``media_ids``, or with none
        listed those of ``owner_id`` (every owner when empty) in ``status`` (``FAILED`` when
        None). Returns the ids sent back."""

    def watch_status(
        self, *, start_revision: int, initial_state: bool
    ) -> AsyncGenerator[StatusEvent, None]:
        """Every status change after ``start_revision``, in revision order, with bookmarks;
        with ``initial_state``, the current status of every item first, ended by a bookmark
        with ``initial_state_end``. Runs until the caller closes it (or a failure ends it:
        ``ResyncNeeded`` when ``start_revision`` cannot be resumed)."""
