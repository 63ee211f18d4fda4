"""Request messages read only once a call is admitted, within a memory budget.

gRPC reads and decodes a unary call's whole message before any interceptor's behaviour
runs: a call refused for its token would already have cost its body (eight unauthenticated
100 MiB uploads held 1.7 GiB), and bytes that do not parse were answered ``UNKNOWN`` with a
traceback logged each time. So every method of ours is served as a request-streaming method,
which gRPC reads only when asked:

- :class:`RequestGate`, the outermost interceptor, hands the chain a :class:`PendingRequest`
  in place of a unary call's message, and decodes a streaming call's messages one by one;
- the chain counts the call, maps errors and authenticates it, reading nothing;
- :class:`RequestReader`, the innermost, reads and decodes the message, within a
  :class:`~mediatag_common.byte_budget.ByteBudget` of request bytes in memory at once (the
  callers waiting for it take turns) and a time limit.

A message that does not parse is ``INVALID_ARGUMENT``/``MALFORMED_REQUEST``, logged on one
line at most every few seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from mediatag_common.auth.scope import current_caller
from mediatag_common.byte_budget import ByteBudget, TooManyWaiting
from mediatag_common.caller_slots import SlotsFull
from mediatag_common.errors import (
    MalformedRequest,
    RequestTooLarge,
    RequestTooSlow,
    ServerBusy,
)
from mediatag_common.interceptors import Behavior, BehaviorInterceptor, is_grpc_own
from mediatag_common.log_limits import RateLimitedLog

logger = logging.getLogger(__name__)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
Deserializer = Callable[[bytes], Any]
Context = grpc.aio.ServicerContext[Any, Any]

MALFORMED_LOG_INTERVAL = 10.0
# The largest request of a call that streams its answer (a watch's filters): it is held for
# as long as the stream is open, by each of up to thousands of streams.
MAX_STREAM_REQUEST_BYTES = 256 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """How request messages are read.

    At most ``max_bytes_in_flight`` bytes of unary request messages are held at once: a
    message being read counts as ``max_message_bytes`` (its size is known only once read),
    a message read as its size until its call's answer. One message is always admitted,
    however large. At most ``max_waiting`` calls wait for room in the budget, each at most
    ``read_timeout`` seconds, and as long again for its message to arrive. Before a message
    is read, gRPC holds what its client sent of it: at most ``stream_window`` bytes (the
    stream's HTTP/2 window), so the waiting calls hold at most ``max_waiting`` windows.
    """

    max_message_bytes: int
    max_bytes_in_flight: int
    read_timeout: float
    stream_window: int
    max_waiting: int
    max_waiting_per_caller: int | None = None


def _too_many_waiting(exc: TooManyWaiting) -> ServerBusy:
    if exc.bound is SlotsFull.CALLER:
        return ServerBusy(
            f"this caller has as many calls waiting for room to be read as it may ({exc.limit})",
            reason="TOO_MANY_WAITING_REQUESTS_FOR_CALLER",
            metadata={"maxWaitingRequestsPerCaller": str(exc.limit)},
        )
    return ServerBusy(
        f"too many requests are being read, and {exc.limit} more wait for room already",
        metadata={"maxWaitingRequests": str(exc.limit)},
    )


_malformed_log = RateLimitedLog(logger, MALFORMED_LOG_INTERVAL)


def _decode(method: str, deserializer: Deserializer, raw: bytes, peer: str) -> Any:
    try:
        return deserializer(raw)
    except DecodeError as exc:
        _malformed_log.warning(
            "malformed",
            "refused %s from %s: %d bytes that are no valid request (%s)",
            method,
            peer,
            len(raw),
            type(exc).__name__,
        )
        raise MalformedRequest(
            f"the request message of {method.rsplit('/', 1)[-1]} could not be decoded"
        ) from exc


class PendingRequest:
    """A unary call's message, not read yet: :class:`RequestReader` reads it."""

    def __init__(
        self, method: str, raw_messages: AsyncIterator[bytes], deserializer: Deserializer
    ) -> None:
        self._method = method
        self._raw_messages = raw_messages
        self._deserializer = deserializer

    async def read(self, context: Context, max_bytes: int | None = None) -> tuple[Any, int]:
        """The decoded message and its size in bytes; one over ``max_bytes`` is refused
        before it is decoded."""
        name = self._method.rsplit("/", 1)[-1]
        messages = aiter(self._raw_messages)
        raw = await anext(messages, None)
        if raw is None:
            await _cancellation_landed(context)
            raise MalformedRequest(f"{name} was sent no message")
        # Read on to the end of the client's stream, as gRPC does for a unary method: a
        # receiver left before it keeps the message's memory (100 MiB per call, measured).
        if await anext(messages, None) is not None:
            raise MalformedRequest(f"{name} takes one request message, it was sent more")
        if max_bytes is not None and len(raw) > max_bytes:
            raise RequestTooLarge(
                f"the request of {name} has {len(raw)} bytes; at most {max_bytes}",
                metadata={"maxBytes": str(max_bytes)},
            )
        return _decode(self._method, self._deserializer, raw, context.peer()), len(raw)


async def _decoded(
    method: str, raw_messages: AsyncIterator[bytes], deserializer: Deserializer, context: Context
) -> AsyncIterator[Any]:
    """A streaming call's messages, decoded as the servicer asks for them."""
    async for raw in raw_messages:
        yield _decode(method, deserializer, raw, context.peer())
    await _cancellation_landed(context)


async def _cancellation_landed(context: Context) -> None:
    """Raise CancelledError if the messages ended because the client cancelled.

    A client that cancels ends the messages as a complete stream would, and gRPC cancels the
    handler's task a moment later: one turn of the loop lets that land first, so the call ends
    CANCELLED instead of being refused for what its client did not send.
    """
    await asyncio.sleep(0)
    if context.cancelled():
        raise asyncio.CancelledError


RequestOf = Callable[[str, AsyncIterator[bytes], Deserializer, Context], Any]


def _pending(
    method: str, raw_messages: AsyncIterator[bytes], deserializer: Deserializer, context: Context
) -> PendingRequest:
    return PendingRequest(method, raw_messages, deserializer)


# Each kind of handler -> the request-streaming kind it is served as, and what stands in for
# its request.
_SERVED_AS: dict[str, tuple[Callable[..., Any], RequestOf]] = {
    "unary_unary": (grpc.stream_unary_rpc_method_handler, _pending),
    "stream_unary": (grpc.stream_unary_rpc_method_handler, _decoded),
    "unary_stream": (grpc.stream_stream_rpc_method_handler, _pending),
    "stream_stream": (grpc.stream_stream_rpc_method_handler, _decoded),
}


class RequestGate(grpc.aio.ServerInterceptor):
    """The outermost interceptor: gRPC reads no request message before the chain asks."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_grpc_own(method):
            return handler
        found: Any = handler
        deserializer: Deserializer = found.request_deserializer or (lambda raw: raw)
        for kind, (factory, request_of) in _SERVED_AS.items():
            inner = getattr(found, kind)
            if inner is not None:
                served: grpc.RpcMethodHandler[_Req, _Resp] = factory(
                    _served(method, inner, request_of, deserializer),
                    request_deserializer=None,
                    response_serializer=found.response_serializer,
                )
                return served
        return handler


def _served(
    method: str, inner: Behavior, request_of: RequestOf, deserializer: Deserializer
) -> Behavior:
    """A behaviour of the same kind as ``inner`` (generator or coroutine) that passes it
    what stands in for its request."""
    if inspect.isasyncgenfunction(inner):

        async def generator(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
            async for response in inner(
                request_of(method, requests, deserializer, context), context
            ):
                yield response

        return generator

    async def coroutine(requests: AsyncIterator[bytes], context: Context) -> Any:
        return await inner(request_of(method, requests, deserializer, context), context)

    return coroutine


class RequestReader(BehaviorInterceptor):
    """The innermost interceptor: reads a unary call's message once the call is admitted."""

    def __init__(self, limits: RequestLimits) -> None:
        self._limits = limits
        self.budget = ByteBudget(
            limits.max_bytes_in_flight,
            max_waiters=limits.max_waiting,
            max_waiters_per_caller=limits.max_waiting_per_caller,
        )

    async def _read(
        self, request: Any, context: Context, max_bytes: int | None = None
    ) -> tuple[Any, int]:
        """The message of ``request`` and the bytes of budget its call holds."""
        if not isinstance(request, PendingRequest):
            return request, 0
        reserved = self._limits.max_message_bytes
        timeout = self._limits.read_timeout
        try:
            async with asyncio.timeout(timeout):
                await self.budget.acquire(reserved, current_caller(context.peer()))
        except TimeoutError as exc:
            raise ServerBusy(
                f"too many requests are being read; none got room within {timeout:g} s",
                metadata={"maxBytesInFlight": str(self._limits.max_bytes_in_flight)},
            ) from exc
        except TooManyWaiting as exc:
            raise _too_many_waiting(exc) from exc
        try:
            async with asyncio.timeout(timeout):
                message, size = await request.read(context, max_bytes)
        except BaseException as exc:
            self.budget.release(reserved)
            if isinstance(exc, TimeoutError):
                raise RequestTooSlow(
                    f"the request message did not arrive within {timeout:g} s"
                ) from exc
            raise
        self.budget.release(reserved - size)
        return message, size

    def wrap_unary(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        async def wrapper(request: Any, context: Context) -> Any:
            message, held = await self._read(request, context)
            try:
                return await behavior(message, context)
            finally:
                self.budget.release(held)

        return wrapper

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        async def wrapper(request: Any, context: Context) -> AsyncIterator[Any]:
            # A stream's request is its filters: small, and held for as long as the stream is
            # open, so it is bounded on its own and leaves the budget once read.
            message, held = await self._read(request, context, MAX_STREAM_REQUEST_BYTES)
            self.budget.release(held)
            async for response in behavior(message, context):
                yield response

        return wrapper
