"""The analysis service's exception tree.

Each class says what went wrong (its ``reason``); the gRPC layer gives it a status code
(``analysis_service.api.status_codes``)::

    AnalysisError                 root (mediatag_common.errors.ServiceError)
    ├── InvalidArgument           a request the client must change
    ├── JobNotFound               JOB_NOT_FOUND
    ├── LeaseLost                 a worker's outcome after its lease was taken over
    ├── StorageUnavailable        the database failed
    ├── AnalyzerFailure           an analyser call failed (never sent to a client)
    │   ├── TransientAnalyzerError
    │   │   └── ContentUnavailable
    │   ├── PermanentAnalyzerError
    │   └── QuotaExceeded
    ├── RevisionCompacted         a watch resumes from before the event log's start
    ├── RevisionAhead             a watch resumes from a revision of another event log
    ├── WatcherTooSlow            a watcher's buffer overflowed
    ├── WatchInterrupted          a replica's feed of the event log has a hole
    ├── TooManyWatchers           no watcher slot left
    └── ShuttingDown              the service is draining
"""

from __future__ import annotations

from mediatag_common.errors import ServiceError


class AnalysisError(ServiceError):
    """Root of every error the analysis service raises on purpose."""


class InvalidArgument(AnalysisError):
    """A request the client must change; ``reason`` says what is wrong."""

    reason = "INVALID_ARGUMENT"


# An INVALID_ARGUMENT refusal naming ``field`` (e.g. ``jobs[2].sha256``).
invalid = InvalidArgument.for_field


class JobNotFound(AnalysisError):
    """No job for the media id asked for."""

    reason = "JOB_NOT_FOUND"


class LeaseLost(AnalysisError):
    """A worker's lease was taken over (it expired); its outcome is discarded."""

    reason = "LEASE_LOST"


class StorageUnavailable(AnalysisError):
    """The database could not be used; wraps the driver's error."""

    reason = "STORAGE_UNAVAILABLE"


class StorageConflict(AnalysisError):
    """Concurrent transactions kept getting in each other's way (the change was not made;
    calling again may succeed)."""

    reason = "STORAGE_CONFLICT"


class AnalyzerFailure(AnalysisError):
    """An analyser call failed. Subclasses say whether a retry can help."""

    transient: bool = False
    reason = "ANALYZER_FAILED"


class TransientAnalyzerError(AnalyzerFailure):
    """Unavailable, deadline, 5xx: worth another attempt after a backoff."""

    transient = True
    reason = "ANALYZER_UNAVAILABLE"


class PermanentAnalyzerError(AnalyzerFailure):
    """Undecodable image, invalid argument: another attempt would fail the same way."""

    transient = False
    reason = "ANALYZER_REJECTED"


class ContentUnavailable(TransientAnalyzerError):
    """The ingest service, which holds the job's bytes, cannot be reached right now.

    Not a failed attempt: neither the image nor the analyser is at fault, so the job waits
    (with backoff) for ingest to come back instead of using up its attempts.
    """

    reason = "CONTENT_UNAVAILABLE"


class QuotaExceeded(AnalyzerFailure):
    """The upstream API refused for quota (RESOURCE_EXHAUSTED / 429).

    Not a failed attempt: the job waits ``retry_after`` seconds and that API's limiter slows down.
    """

    transient = True
    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, *, api: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.api = api
        self.retry_after = retry_after


class RevisionCompacted(AnalysisError):
    """A watch asked to resume from a revision the event log no longer keeps."""

    reason = "REVISION_COMPACTED"


class RevisionAhead(AnalysisError):
    """A watch asked to resume from a revision this service has not written (its database
    was replaced or restored from a backup)."""

    reason = "REVISION_AHEAD"


class WatcherTooSlow(AnalysisError):
    """A watcher's buffer overflowed; it should resume from its last revision."""

    reason = "WATCHER_TOO_SLOW"


class WatchInterrupted(AnalysisError):
    """This replica lost its place in the event log: the log was compacted past what its
    tailer had read (it could not read the log for longer than the log keeps). Its live
    watchers are ended rather than handed the hole; each resumes from its last revision, and
    the log tells it whether that revision is still kept (REVISION_COMPACTED)."""

    reason = "WATCH_INTERRUPTED"


class TooManyWatchers(AnalysisError):
    """Every watcher slot is taken."""

    reason = "TOO_MANY_WATCHERS"


class ShuttingDown(AnalysisError):
    """The service is draining; clients resume elsewhere or after the restart."""

    reason = "SHUTTING_DOWN"
