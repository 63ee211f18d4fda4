"""The gRPC status code of each error of the ingest service (see mediatag_common.status).

A class not listed has the code of its nearest listed base; the root's is INTERNAL.
"""

from __future__ import annotations

import grpc

from ingest_service import errors
from mediatag_common.status import StatusCodes

STATUS_CODES: StatusCodes = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.MediaNotFound: grpc.StatusCode.NOT_FOUND,
    errors.WebhookDeliveryNotFound: grpc.StatusCode.NOT_FOUND,
    errors.WebhookEndpointNotFound: grpc.StatusCode.NOT_FOUND,
    errors.StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.StorageQuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.BlobMissing: grpc.StatusCode.DATA_LOSS,
    errors.StorageConflict: grpc.StatusCode.ABORTED,
    errors.AnalysisUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.RequestIdReused: grpc.StatusCode.ALREADY_EXISTS,
    errors.UploadStalled: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.TooManyUploadStreams: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooManyContentReads: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ContentReadStalled: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ContentCheckFailed: grpc.StatusCode.UNAVAILABLE,
}
