"""Server interceptors that wrap each method's behaviour, unary or streaming."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

Behavior = Callable[..., Any]
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

# Health and reflection: gRPC's own services, served as gRPC serves them.
_GRPC_OWN_SERVICES = "/grpc."

_UNARY_RESPONSE = ("unary_unary", "stream_unary")
_STREAM_RESPONSE = ("unary_stream", "stream_stream")


def is_grpc_own(method: str) -> bool:
    """Whether ``method`` belongs to gRPC's own health or reflection service."""
    return method.startswith(_GRPC_OWN_SERVICES)


class BehaviorInterceptor(grpc.aio.ServerInterceptor):
    """Replaces the behaviour of every known method with ``wrap_unary``/``wrap_stream`` of it.

    ``kind`` is the handler attribute it came from: ``unary_unary``, ``unary_stream``,
    ``stream_unary`` or ``stream_stream``. Unknown methods are passed through untouched.
    """

    def wrap_unary(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        """A behaviour whose call is awaited: a unary response, or a streaming one written
        with ``context.write()`` (as grpc_health's ``Watch``)."""
        raise NotImplementedError

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        """A behaviour that yields its responses (streaming response)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        replaced: dict[str, Behavior] = {}
        for kind in _UNARY_RESPONSE:
            if (behavior := getattr(handler, kind)) is not None:
                replaced[kind] = self.wrap_unary(method, kind, behavior)
        for kind in _STREAM_RESPONSE:
            if (behavior := getattr(handler, kind)) is not None:
                # gRPC iterates what a generator yields but awaits a coroutine that writes
                # its responses; a wrapper must be of the same kind as what it wraps.
                wrap = self.wrap_stream if inspect.isasyncgenfunction(behavior) else self.wrap_unary
                replaced[kind] = wrap(method, kind, behavior)
        # RpcMethodHandler is a namedtuple at run time; its stub does not say so.
        result: grpc.RpcMethodHandler[_Req, _Resp] = handler._replace(**replaced)  # type: ignore[attr-defined]
        return result
