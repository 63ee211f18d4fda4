"""Request messages read only once a call is admitted, within a memory budget.

gRPC reads and decodes a unary call's whole message before any interceptor's behaviour
runs: a call refused for its token would already have cost its body (eight unauthenticated
100 MiB uploads held 1.7 GiB), and bytes that do not parse were answered ``UNKNOWN`` with a
traceback logged each time. So every method, gRPC's own health and reflection too, is served
as a request-streaming method, which gRPC reads only when asked:

- :class:`RequestGate`, the outermost interceptor, hands the chain a :class:`PendingRequest`
  in place of the request, reading nothing;
- the chain counts the call, maps errors and authenticates it, reading nothing;
- :class:`RequestReader`, the innermost, reads and decodes the message (or a request stream's
  messages, each as the servicer asks for it), within a
  :class:`~mediatag_common.byte_budget.ByteBudget` of request bytes in memory at once (the
  callers waiting for it take turns), a time limit and a size limit.

A message that does not parse is ``INVALID_ARGUMENT``/``MALFORMED_REQUEST``, logged on one
line at most every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
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
# gRPC's own requests (a health check's service name, a reflection query) are tiny by nature,
# need no token, and are read one at a time: each wait, for room and then for the message
# (sent with the call), is short, so that a client holding the room does not keep a load
# balancer's health checks waiting for long; the callers waiting are bounded like the others.
GRPC_OWN_MAX_REQUEST_BYTES = 4 * 1024
GRPC_OWN_READ_TIMEOUT = 2.0
GRPC_OWN_MAX_WAITING = 64
GRPC_OWN_MAX_WAITING_PER_CALLER = 16


@dataclass(frozen=True)
class RequestLimits:
    """How request messages are read.

    At most ``max_bytes_in_flight`` bytes of unary request messages are held at once: a
    message being read counts as ``max_message_bytes`` (its size is known only once read),
    a message read as its size until its call's answer. One message is always admitted,
    however large. At most ``max_waiting`` calls wait for room in the budget, each at most
    ``read_timeout`` seconds, and as long again for its message to arrive. Before a message
    is read, gRPC holds what its client sent of it: at most ``stream_window`` bytes (the
    stream's HTTP/2 window), so the waiting calls hold at most ``max_waiting`` windows. A
    request stream's message may have ``max_stream_message_bytes``, and counts as that much
    while it is read, then as its size until the servicer asks for the next (it waits for its
    client as long as the servicer's pace allows).
    """

    max_message_bytes: int
    max_bytes_in_flight: int
    read_timeout: float
    stream_window: int
    max_waiting: int
    max_waiting_per_caller: int | None = None
    max_stream_message_bytes: int = 4 * 1024 * 1024


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
    """A call's request messages, not read yet: :class:`RequestReader` reads them, a unary
    call's one message or a request stream's each in turn."""

    def __init__(
        self,
        method: str,
        raw_messages: AsyncIterator[bytes],
        deserializer: Deserializer,
        *,
        streamed: bool,
    ) -> None:
        self.method = method
        self.streamed = streamed
        self._raw_messages = aiter(raw_messages)
        self._deserializer = deserializer

    @property
    def name(self) -> str:
        return self.method.rsplit("/", 1)[-1]

    async def next_raw(self) -> bytes | None:
        """The next message's bytes; None at the end of the stream."""
        return await anext(self._raw_messages, None)

    async def only_raw(self, context: Context) -> bytes:
        """A unary call's one message."""
        raw = await self.next_raw()
        if raw is None:
            await _cancellation_landed(context)
            raise MalformedRequest(f"{self.name} was sent no message")
        # Read on to the end of the client's stream, as gRPC does for a unary method: a
        # receiver left before it keeps the message's memory (100 MiB per call, measured).
        if await self.next_raw() is not None:
            raise MalformedRequest(f"{self.name} takes one request message, it was sent more")
        return raw

    def decode(self, raw: bytes, context: Context) -> Any:
        return _decode(self.method, self._deserializer, raw, context.peer())


async def _cancellation_landed(context: Context) -> None:
    """Raise CancelledError if the messages ended because the client cancelled.

    A client that cancels ends the messages as a complete stream would, and gRPC cancels the
    handler's task a moment later: one turn of the loop lets that land first, so the call ends
    CANCELLED instead of being refused for what its client did not send.
    """
    await asyncio.sleep(0)
    if context.cancelled():
        raise asyncio.CancelledError


RequestOf = Callable[[str, AsyncIterator[bytes], Deserializer], PendingRequest]


def _unary(method: str, raw_messages: AsyncIterator[bytes], deserializer: Deserializer) -> Any:
    return PendingRequest(method, raw_messages, deserializer, streamed=False)


def _streamed(method: str, raw_messages: AsyncIterator[bytes], deserializer: Deserializer) -> Any:
    return PendingRequest(method, raw_messages, deserializer, streamed=True)


# Each kind of handler -> the request-streaming kind it is served as, and what stands in for
# its request.
_SERVED_AS: dict[str, tuple[Callable[..., Any], RequestOf]] = {
    "unary_unary": (grpc.stream_unary_rpc_method_handler, _unary),
    "stream_unary": (grpc.stream_unary_rpc_method_handler, _streamed),
    "unary_stream": (grpc.stream_stream_rpc_method_handler, _unary),
    "stream_stream": (grpc.stream_stream_rpc_method_handler, _streamed),
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
        if handler is None:
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
            async for response in inner(request_of(method, requests, deserializer), context):
                yield response

        return generator

    async def coroutine(requests: AsyncIterator[bytes], context: Context) -> Any:
        return await inner(request_of(method, requests, deserializer), context)

    return coroutine


@dataclass(frozen=True)
class _ReadRules:
    """How one kind of request message is read: within which budget, counted as how many
    bytes while it is read (None: the largest message), how long each wait (for room, then for
    the message; None: as long as the servicer waits) may take, at most how large, refused as
    what."""

    budget: ByteBudget
    timeout: float
    arrival_timeout: float | None
    max_bytes: int | None
    too_large_reason: str = RequestTooLarge.reason
    reserved: int | None = None


class RequestReader(BehaviorInterceptor):
    """The innermost interceptor: reads a call's request messages once the call is admitted.

    gRPC reads a message whole before it can be measured, up to the server's largest, so a
    message being read counts as that largest in its budget (but for a request stream's, see
    below). gRPC's own health and reflection
    calls, which need no token, are read in a budget of their own, one at a time: they never
    take the room of the services' calls, and those never hold up a health check.
    """

    def __init__(self, limits: RequestLimits) -> None:
        self._limits = limits
        self.budget = ByteBudget(
            limits.max_bytes_in_flight,
            max_waiters=limits.max_waiting,
            max_waiters_per_caller=limits.max_waiting_per_caller,
        )
        timeout = limits.read_timeout
        self._unary = _ReadRules(self.budget, timeout, timeout, None)
        # A stream's request is its filters: small, and held for as long as the stream is
        # open, so it is bounded on its own and leaves the budget once read.
        self._stream_filters = _ReadRules(self.budget, timeout, timeout, MAX_STREAM_REQUEST_BYTES)
        # A stream's message (an upload's chunk) counts as its bound while it is read, not as
        # the largest message: a stream waits for its client's next chunk for as long as its
        # servicer's pace allows, and a few streams would hold all the room meanwhile. gRPC
        # still reads a larger one whole before it is refused, and it is dropped at once.
        self._stream_messages = _ReadRules(
            self.budget,
            timeout,
            None,
            limits.max_stream_message_bytes,
            "CHUNK_TOO_LARGE",
            limits.max_stream_message_bytes,
        )
        self._grpc_own = _ReadRules(
            ByteBudget(
                limits.max_message_bytes,
                max_waiters=GRPC_OWN_MAX_WAITING,
                max_waiters_per_caller=GRPC_OWN_MAX_WAITING_PER_CALLER,
            ),
            GRPC_OWN_READ_TIMEOUT,
            GRPC_OWN_READ_TIMEOUT,
            GRPC_OWN_MAX_REQUEST_BYTES,
        )

    async def _read_raw(
        self, request: PendingRequest, context: Context, rules: _ReadRules
    ) -> bytes | None:
        """The next message of ``request`` (None at the end of a stream), read within
        ``rules``; the budget then holds its size."""
        budget = rules.budget
        reserved = rules.reserved or self._limits.max_message_bytes
        try:
            async with asyncio.timeout(rules.timeout):
                await budget.acquire(reserved, current_caller(context.peer()))
        except TimeoutError as exc:
            raise ServerBusy(
                f"too many requests are being read; none got room within {rules.timeout:g} s",
                metadata={"maxBytesInFlight": str(budget.total)},
            ) from exc
        except TooManyWaiting as exc:
            raise _too_many_waiting(exc) from exc
        try:
            async with asyncio.timeout(rules.arrival_timeout):
                raw = await (request.next_raw() if request.streamed else request.only_raw(context))
        except BaseException as exc:
            budget.release(reserved)
            if isinstance(exc, TimeoutError):
                raise RequestTooSlow(
                    f"the request message did not arrive within {rules.arrival_timeout:g} s"
                ) from exc
            raise
        size = 0 if raw is None else len(raw)
        if rules.max_bytes is not None and size > rules.max_bytes:
            budget.release(reserved)
            raise RequestTooLarge(
                f"a request message of {request.name} has {size} bytes; at most {rules.max_bytes}",
                reason=rules.too_large_reason,
                metadata={"maxBytes": str(rules.max_bytes)},
            )
        budget.release(reserved - size)
        return raw

    async def _messages(
        self, request: PendingRequest, context: Context, rules: _ReadRules
    ) -> AsyncIterator[Any]:
        """A request stream's messages, each read once the servicer asks for it. The budget
        holds one until the servicer asks for the next: holding more while waiting for room,
        a stream could keep out, for good, a call ahead of it that needs that room."""
        while (raw := await self._read_raw(request, context, rules)) is not None:
            try:
                yield request.decode(raw, context)
            finally:
                rules.budget.release(len(raw))
        await _cancellation_landed(context)

    @contextlib.asynccontextmanager
    async def _request(
        self, request: Any, context: Context, method: str, *, streams_answer: bool
    ) -> AsyncIterator[Any]:
        """What the behaviour of ``method`` is handed: its message, or its messages as they
        come. The budget holds a message until the call is answered (a stream's filters, and
        gRPC's own requests, only until read)."""
        if not isinstance(request, PendingRequest):
            yield request
            return
        own = is_grpc_own(method)
        if request.streamed:
            yield self._messages(request, context, self._grpc_own if own else self._stream_messages)
            return
        rules = self._grpc_own if own else self._stream_filters if streams_answer else self._unary
        raw = await self._read_raw(request, context, rules)
        assert raw is not None  # only_raw() never ends without one
        held = 0 if own or streams_answer else len(raw)
        rules.budget.release(len(raw) - held)
        try:
            yield request.decode(raw, context)
        finally:
            rules.budget.release(held)

    def wrap_unary(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        # grpc_health's Watch answers with context.write(): a stream, whatever its kind.
        streams_answer = kind in ("unary_stream", "stream_stream")

        async def wrapper(request: Any, context: Context) -> Any:
            async with self._request(
                request, context, method, streams_answer=streams_answer
            ) as message:
                return await behavior(message, context)

        return wrapper

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        async def wrapper(request: Any, context: Context) -> AsyncIterator[Any]:
            async with self._request(request, context, method, streams_answer=True) as message:
                async for response in behavior(message, context):
                    yield response

        return wrapper
