"""A bound on the calls a service serves at once, streams included.

gRPC's own bound (``maximum_concurrent_rpcs``) refuses before any interceptor runs: without
the AIP-193 reason every other refusal carries, and unseen by the call metrics. This gate
sits just inside the error mapping, so its refusal is ``RESOURCE_EXHAUSTED``/``TOO_MANY_CALLS``
like any other and is counted; gRPC's own health and reflection services pass it by, so a
busy service still answers its health checks. Their streams (``Health/Watch``, reflection),
which need no token, are bounded apart: in all, and of one peer address.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from mediatag_common.auth.scope import current_caller
from mediatag_common.caller_slots import CallerSlots, SlotsFull
from mediatag_common.errors import TooManyCalls
from mediatag_common.interceptors import Behavior, BehaviorInterceptor, is_grpc_own

_STREAM_KINDS = ("unary_stream", "stream_stream")


class CallGate(BehaviorInterceptor):
    """At most ``max_calls`` calls in progress; one beyond is refused at once. gRPC's own
    streams are not counted there: at most ``max_health_streams`` are open, at most
    ``max_health_streams_per_peer`` of one peer address (None: a tenth of them)."""

    def __init__(
        self,
        max_calls: int,
        *,
        max_health_streams: int,
        max_health_streams_per_peer: int | None = None,
    ) -> None:
        self.max_calls = max_calls
        self.in_progress = 0
        self._health_streams = CallerSlots(
            clients=max_health_streams,
            per_caller=max_health_streams_per_peer or max(1, max_health_streams // 10),
            # Nobody is a service here: these calls are never authenticated.
            per_service=max_health_streams,
        )

    @contextlib.contextmanager
    def _health_stream(self, context: Any) -> Iterator[None]:
        caller = current_caller(context.peer())
        full = self._health_streams.take(caller)
        if full is not None:
            limit = self._health_streams.limit(full)
            if full is SlotsFull.CALLER:
                raise TooManyCalls(
                    f"this peer has {limit} health or reflection streams open already",
                    reason="TOO_MANY_HEALTH_STREAMS_FOR_PEER",
                    metadata={"maxHealthStreamsPerPeer": str(limit)},
                )
            raise TooManyCalls(
                f"the service has {limit} health or reflection streams open already",
                reason="TOO_MANY_HEALTH_STREAMS",
                metadata={"maxHealthStreams": str(limit)},
            )
        try:
            yield
        finally:
            self._health_streams.give_back(caller)

    def _enter(self) -> None:
        if self.in_progress >= self.max_calls:
            raise TooManyCalls(
                f"the service serves {self.max_calls} calls at once already",
                metadata={"maxCalls": str(self.max_calls)},
            )
        self.in_progress += 1

    def wrap_unary(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        if is_grpc_own(method):
            if kind not in _STREAM_KINDS:
                return behavior

            # grpc_health's Watch answers with context.write(): a stream all the same.
            async def health_stream(request: Any, context: Any) -> Any:
                with self._health_stream(context):
                    return await behavior(request, context)

            return health_stream

        async def wrapper(request: Any, context: Any) -> Any:
            self._enter()
            try:
                return await behavior(request, context)
            finally:
                self.in_progress -= 1

        return wrapper

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        if is_grpc_own(method):

            async def health_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                with self._health_stream(context):
                    async for response in behavior(request, context):
                        yield response

            return health_stream

        async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
            self._enter()
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self.in_progress -= 1

        return wrapper
