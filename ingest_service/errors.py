"""The ingest service's exception tree; the root maps to gRPC statuses in one place."""

from __future__ import annotations

import errno

import grpc

from mediatag_common.errors import FieldViolation, ServiceError


class IngestError(ServiceError):
    """Root of every error the ingest service raises on purpose."""


class InvalidArgument(IngestError):
    """A request the client must change; ``reason`` says what is wrong."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class MediaNotFound(IngestError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MEDIA_NOT_FOUND"


class StorageUnavailable(IngestError):
    """The database or the blob store could not be used; wraps the underlying error."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORAGE_UNAVAILABLE"


class StorageFull(StorageUnavailable):
    """The disk (or the process's file-size limit, or a quota) has no room for the upload."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "STORAGE_FULL"


# Out of room, as opposed to a disk that failed or is read-only.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def blob_store_error(exc: OSError, what: str) -> StorageUnavailable:
    """The refusal for a blob store failure: full (RESOURCE_EXHAUSTED) or unavailable."""
    if exc.errno in _NO_ROOM:
        return StorageFull(f"no room to store {what}: {exc.strerror}")
    return StorageUnavailable(f"blob store unavailable for {what}: {exc}")


class AnalysisUnavailable(IngestError):
    """The analysis service could not be reached for a call that needs its answer."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "ANALYSIS_UNAVAILABLE"


class RequestIdReused(IngestError):
    """A request id already recorded for an upload with other content or metadata."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "REQUEST_ID_REUSED"


class UploadStalled(IngestError):
    """A streamed upload sent nothing for longer than the idle timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "UPLOAD_STALLED"


def invalid(field: str, reason: str, description: str) -> InvalidArgument:
    """An INVALID_ARGUMENT refusal naming ``field`` (e.g. ``files[2].content``)."""
    return InvalidArgument(
        f"{field}: {description}",
        reason=reason,
        field_violations=[FieldViolation(field, description)],
    )


def media_not_found(media_id: str, field: str = "media_id") -> MediaNotFound:
    return MediaNotFound(
        f"no media with id {media_id!r}",
        field_violations=[FieldViolation(field, f"unknown media id {media_id!r}")],
    )
