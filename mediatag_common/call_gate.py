"""A bound on the calls a service serves at once, streams included.

gRPC's own bound (``maximum_concurrent_rpcs``) refuses before any interceptor runs: without
the AIP-193 reason every other refusal carries, and unseen by the call metrics. This gate
sits just inside the error mapping, so its refusal is ``RESOURCE_EXHAUSTED``/``TOO_MANY_CALLS``
like any other and is counted; gRPC's own health and reflection services pass it by, so a
busy service still answers its health checks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from mediatag_common.errors import TooManyCalls
from mediatag_common.interceptors import Behavior, BehaviorInterceptor, is_grpc_own


class CallGate(BehaviorInterceptor):
    """At most ``max_calls`` calls in progress; one beyond is refused at once."""

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self.in_progress = 0

    def _enter(self) -> None:
        if self.in_progress >= self.max_calls:
            raise TooManyCalls(
                f"the service serves {self.max_calls} calls at once already",
                metadata={"maxCalls": str(self.max_calls)},
            )
        self.in_progress += 1

    def wrap_unary(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        if is_grpc_own(method):
            return behavior

        async def wrapper(request: Any, context: Any) -> Any:
            self._enter()
            try:
                return await behavior(request, context)
            finally:
                self.in_progress -= 1

        return wrapper

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        if is_grpc_own(method):
            return behavior

        async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
            self._enter()
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self.in_progress -= 1

        return wrapper
