"""Refusals as gRPC statuses with AIP-193 details, mapped in one place for both services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mediatag_common.interceptors import Behavior, BehaviorInterceptor

DOMAIN = "mediatag"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field, named by its path in the request (e.g. ``files[3].content``)."""

    field: str
    description: str


class ServiceError(Exception):
    """A refusal a client can act on; each service derives its own root from this.

    ``code`` and ``reason`` are class defaults that subclasses override; an instance may
    override either for one refusal.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        code: grpc.StatusCode | None = None,
        field_violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if code is not None:
            self.code = code
        self.field_violations = tuple(field_violations)
        self.metadata = dict(metadata or {})


def to_grpc_status(error: ServiceError) -> grpc.Status:
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
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> None:
    status = to_grpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _internal(method: str, exc: Exception) -> ServiceError:
    logger.exception("unexpected error in %s", method, exc_info=exc)
    return ServiceError("internal error", reason="INTERNAL", code=grpc.StatusCode.INTERNAL)


def _wrap_unary(method: str, behavior: Behavior) -> Behavior:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except ServiceError as error:
            await _abort(context, error)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, _internal(method, exc))

    return wrapper


def _wrap_stream(method: str, behavior: Behavior) -> Behavior:
    async def wrapper(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except ServiceError as error:
            await _abort(context, error)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            # Re-raised: swallowing a cancellation leaks the call (grpc/grpc#43360).
            raise
        except Exception as exc:
            await _abort(context, _internal(method, exc))

    return wrapper


class ErrorMappingInterceptor(BehaviorInterceptor):
    """Turns every :class:`ServiceError` a servicer raises into its gRPC status.

    Unexpected exceptions are logged with their traceback and answered ``INTERNAL``
    without leaking their text to the client.
    """

    def wrap_unary(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        return _wrap_unary(method, behavior)

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        return _wrap_stream(method, behavior)


# WatchStatus refusals (OUT_OF_RANGE) after which a client starts over from the current state
# (send_initial_state): its revision was compacted away, or belongs to a replaced event log.
RESYNC_REASONS = frozenset({"REVISION_COMPACTED", "REVISION_AHEAD"})


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo carried by a failed call, if any (for clients and tests)."""
    status = rpc_status.from_call(cast(grpc.Call, error))
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def field_violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> list[FieldViolation]:
    """The BadRequest field violations carried by a failed call."""
    status = rpc_status.from_call(cast(grpc.Call, error))
    found: list[FieldViolation] = []
    if status is None:
        return found
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
    return found
