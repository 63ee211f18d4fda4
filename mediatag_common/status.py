"""Refusals as gRPC statuses: the code of each error class, AIP-193 details, and the
interceptor that turns what a servicer raises into its status.

The code of an error is looked up in a table by its class, then by each of its bases in
turn: a class not in the table has its parent's code, and adding a class with a code of its
own is one line. :data:`STATUS_CODES` holds the classes of :mod:`mediatag_common.errors`;
each service adds a table of its own classes beside its servicer (``api/status_codes.py``)
and passes it to :func:`mediatag_common.grpc_server.new_server`. One table per service
rather than one shared: this package knows neither service, and each service's gRPC layer
owns how its refusals look, as it owns its method roles.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mediatag_common.errors import (
    DOMAIN,
    MalformedRequest,
    PermissionDenied,
    RequestTooLarge,
    RequestTooSlow,
    ServerBusy,
    ServiceError,
    TooManyCalls,
    Unauthenticated,
)
from mediatag_common.interceptors import Behavior, BehaviorInterceptor
from mediatag_common.log_limits import RateLimitedLog

logger = logging.getLogger(__name__)

StatusCodes = Mapping[type[ServiceError], grpc.StatusCode]

STATUS_CODES: StatusCodes = {
    ServiceError: grpc.StatusCode.INTERNAL,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestTooSlow: grpc.StatusCode.DEADLINE_EXCEEDED,
    ServerBusy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyCalls: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Codes that say the service failed, not the request: their cause is logged.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)
# A refusal at one of the service's bounds (calls, request memory, watchers, streams, the
# disk): the operator may need to raise it, so it is logged, once per reason and interval
# (a burst meets a bound thousands of times). A request over its size limit is the
# client's own, and is not.
BOUND_LOG_INTERVAL = 10.0


def status_code(error: ServiceError, codes: StatusCodes) -> grpc.StatusCode:
    """The code of ``error``'s class in ``codes``, else of its nearest base there."""
    for cls in type(error).__mro__:
        code = codes.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def to_grpc_status(error: ServiceError, code: grpc.StatusCode) -> grpc.Status:
    """The AIP-193 ``google.rpc.Status`` for ``error``: one ErrorInfo, plus BadRequest."""
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if error.field_violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.field_violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


class ErrorMappingInterceptor(BehaviorInterceptor):
    """Turns every :class:`ServiceError` a servicer raises into its gRPC status.

    ``codes`` maps error classes to status codes (:data:`STATUS_CODES` plus the service's
    own). Unexpected exceptions are logged with their traceback and answered ``INTERNAL``
    without leaking their text to the client. Refusals at the service's bounds
    (``RESOURCE_EXHAUSTED``) are logged at most once per reason every
    :data:`BOUND_LOG_INTERVAL` seconds, saying how many were not.
    """

    def __init__(self, codes: StatusCodes = STATUS_CODES) -> None:
        self._codes = {**STATUS_CODES, **codes}
        self._bound_log = RateLimitedLog(logger, BOUND_LOG_INTERVAL)

    def _status(self, method: str, error: ServiceError) -> grpc.Status:
        code = status_code(error, self._codes)
        if code in _SERVER_FAULTS and error.__cause__ is not None:
            # The client reads the message; what failed (SQL, a path) is for the log only.
            logger.warning("%s refused with %s: %s", method, code.name, error)
        elif code is grpc.StatusCode.RESOURCE_EXHAUSTED and not isinstance(error, RequestTooLarge):
            self._bound_log.warning(
                error.reason,
                "%s refused with %s %s: %s",
                method,
                code.name,
                error.reason,
                error.message,
            )
        return to_grpc_status(error, code)

    @staticmethod
    def _internal(method: str, exc: Exception) -> ServiceError:
        logger.exception("unexpected error in %s", method, exc_info=exc)
        return ServiceError("internal error")

    # The abort is raised outside the ``except`` block, on purpose: raised inside, it would
    # chain the refusal, whose traceback holds the request, to gRPC's abort exception, which
    # sits in a reference cycle with the call's state. The request (an upload's 100 MiB)
    # would then live until the cycle collector ran: eight refused uploads held 1.7 GiB.

    def wrap_unary(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behavior(request, context)
            except ServiceError as error:
                status = self._status(method, error)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                status = self._status(method, self._internal(method, exc))
            await context.abort(status.code, status.details, status.trailing_metadata)
            return None  # not reached: abort raises

        return wrapper

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        async def wrapper(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request, context):
                    yield response
                return
            except ServiceError as error:
                status = self._status(method, error)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                # Re-raised: swallowing a cancellation leaks the call (grpc/grpc#43360).
                raise
            except Exception as exc:
                status = self._status(method, self._internal(method, exc))
            await context.abort(status.code, status.details, status.trailing_metadata)

        return wrapper
