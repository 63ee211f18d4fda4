"""The ingest service's exception tree.

Each class says what went wrong (its ``reason``); the gRPC layer gives it a status code
(``ingest_service.api.status_codes``)::

    IngestError                   root (mediatag_common.errors.ServiceError)
    ├── InvalidArgument           a request the client must change
    ├── MediaNotFound             MEDIA_NOT_FOUND
    ├── WebhookDeliveryNotFound   WEBHOOK_DELIVERY_NOT_FOUND
    ├── WebhookEndpointNotFound   WEBHOOK_ENDPOINT_NOT_FOUND
    ├── StorageUnavailable        the database or the blob store failed
    │   ├── StorageFull           no room for the upload
    │   ├── StorageQuotaExceeded  the blob store's request quota or rate limit is exceeded
    │   └── StoragePermissionDenied  the blob store refused the service's credentials
    ├── BlobMissing               an item's blob is not in the blob store
    ├── StorageConflict           concurrent transactions kept refusing a change (retry it)
    ├── AnalysisUnavailable       the analysis service cannot be reached
    ├── AnalysisRefused           the analysis service refused a call made for the client
    ├── RequestIdReused           REQUEST_ID_REUSED
    ├── UploadStalled             a stream sent nothing for too long
    │   └── UploadTooSlow         or too little
    ├── TooManyUploadStreams      no upload stream slot left
    ├── TooManyContentReads       no content read slot left
    ├── ContentReadStalled        a content read's client took nothing for too long
    └── ContentCheckFailed        the service itself failed checking a file (not the file)
"""

from __future__ import annotations

import errno

from mediatag_common.errors import FieldViolation, ServiceError


class IngestError(ServiceError):
    """Root of every error the ingest service raises on purpose."""


class InvalidArgument(IngestError):
    """A request the client must change; ``reason`` says what is wrong."""

    reason = "INVALID_ARGUMENT"


class MediaNotFound(IngestError):
    """No media with the id asked for."""

    reason = "MEDIA_NOT_FOUND"


class WebhookDeliveryNotFound(IngestError):
    """No undelivered webhook delivery with the id asked for (unknown, or delivered)."""

    reason = "WEBHOOK_DELIVERY_NOT_FOUND"


class WebhookEndpointNotFound(IngestError):
    """The webhooks file names no endpoint of the name asked for."""

    reason = "WEBHOOK_ENDPOINT_NOT_FOUND"


class StorageUnavailable(IngestError):
    """The database or the blob store could not be used; wraps the underlying error."""

    reason = "STORAGE_UNAVAILABLE"


class StorageFull(StorageUnavailable):
    """The disk (or the process's file-size limit, or a quota) has no room for the upload."""

    reason = "STORAGE_FULL"


class StorageQuotaExceeded(StorageUnavailable):
    """The blob store refused a call for its quota or rate limit; later it may succeed."""

    reason = "STORAGE_QUOTA_EXCEEDED"


class StoragePermissionDenied(StorageUnavailable):
    """The blob store refused the service's credentials (or it found none)."""

    reason = "STORAGE_PERMISSION_DENIED"


class BlobMissing(IngestError):
    """An item's row names a blob the store does not hold (lost, or left behind when the
    blob store changed): reading it again will not find it either."""

    reason = "BLOB_MISSING"


class StorageConflict(IngestError):
    """Concurrent transactions (of this or another ingest process) kept refusing a change
    after it was retried; the whole request may be retried."""

    reason = "STORAGE_CONFLICT"


# Out of room, as opposed to a disk that failed or is read-only.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def blob_store_error(exc: OSError) -> StorageUnavailable:
    """The refusal for a failure of a local blob directory: full or unavailable.

    The message names no path: clients read it. The cause stays chained for the log.
    """
    if exc.errno in _NO_ROOM:
        return StorageFull(f"no room in the blob store: {exc.strerror}")
    return StorageUnavailable(f"blob store unavailable: {exc.strerror or type(exc).__name__}")


class AnalysisUnavailable(IngestError):
    """The analysis service could not be reached for a call that needs its answer."""

    reason = "ANALYSIS_UNAVAILABLE"


class AnalysisRefused(IngestError):
    """The analysis service refused a call made on the client's behalf; ``reason`` is its."""

    reason = "ANALYSIS_REFUSED"


class RequestIdReused(IngestError):
    """A request id already recorded for an upload with other content or metadata."""

    reason = "REQUEST_ID_REUSED"


class UploadStalled(IngestError):
    """A streamed upload sent nothing for longer than the idle timeout."""

    reason = "UPLOAD_STALLED"


class UploadTooSlow(UploadStalled):
    """A streamed upload brought less than the minimum rate over a window."""

    reason = "UPLOAD_TOO_SLOW"


class TooManyUploadStreams(IngestError):
    """Every upload stream slot is taken, or the caller's share of them."""

    reason = "TOO_MANY_UPLOAD_STREAMS"


class TooManyContentReads(IngestError):
    """Every ``ReadMediaContent`` slot is taken, or the caller's share of them."""

    reason = "TOO_MANY_CONTENT_READS"


class ContentReadStalled(IngestError):
    """A ``ReadMediaContent`` client took nothing for longer than the idle timeout."""

    reason = "CONTENT_READ_STALLED"


class ContentCheckFailed(IngestError):
    """Checking an uploaded file failed for a reason of the service's own (out of file
    descriptors or memory, an I/O error), not of the file: the same upload may succeed later."""

    reason = "CONTENT_CHECK_FAILED"


# An INVALID_ARGUMENT refusal naming ``field`` (e.g. ``files[2].content``).
invalid = InvalidArgument.for_field


def media_not_found(media_id: str, field: str = "media_id") -> MediaNotFound:
    return MediaNotFound(
        f"no media with id {media_id!r}",
        field_violations=[FieldViolation(field, f"unknown media id {media_id!r}")],
    )
