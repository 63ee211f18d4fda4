"""The gRPC status code of each error of the analysis service (see mediatag_common.status).

A class not listed has the code of its nearest listed base; the root's is INTERNAL.
"""

from __future__ import annotations

import grpc

from analysis_service import errors
from mediatag_common.status import StatusCodes

STATUS_CODES: StatusCodes = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.JobNotFound: grpc.StatusCode.NOT_FOUND,
    errors.LeaseLost: grpc.StatusCode.ABORTED,
    errors.StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.StorageConflict: grpc.StatusCode.ABORTED,
    errors.RevisionCompacted: grpc.StatusCode.OUT_OF_RANGE,
    errors.RevisionAhead: grpc.StatusCode.OUT_OF_RANGE,
    errors.WatcherTooSlow: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # As a shutdown: what clients resume on, from their last revision.
    errors.WatchInterrupted: grpc.StatusCode.UNAVAILABLE,
    errors.TooManyWatchers: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}
