"""What every handler shares: the gateway's parts, the caller, and calling a service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf import message

from mediatag_common.caller_slots import CallerSlots
from web_gateway.api.callers import Caller, Callers
from web_gateway.config import WebConfig
from web_gateway.domain.throughput import Throughput
from web_gateway.domain.watches import SharedWatches
from web_gateway.errors import invalid
from web_gateway.protojson import from_json, from_query, to_json
from web_gateway.upstream import Upstream, refusal_of

_Req = TypeVar("_Req", bound=message.Message)
_Resp = TypeVar("_Resp", bound=message.Message)

JSON = "application/json"


@dataclass
class Gateway:
    """The parts of a running gateway the handlers use."""

    config: WebConfig
    upstream: Upstream
    watches: SharedWatches
    callers: Callers
    throughput: Throughput
    # Places for uploads in progress, shared out by caller.
    uploads: CallerSlots

    @property
    def uploads_in_progress(self) -> int:
        return self.uploads.taken


GATEWAY = web.AppKey("gateway", Gateway)
# The caller, identified (and CSRF-checked) by the middleware before the handler.
CALLER = web.RequestKey("caller", Caller)


def gateway_of(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


def caller_of(request: web.Request) -> Caller:
    return request[CALLER]


async def call(
    method: Callable[..., Awaitable[_Resp]], request_message: Any, request: web.Request
) -> _Resp:
    """A unary call to a service as the caller; its refusal passed on as it is."""
    try:
        return await method(
            request_message,
            metadata=caller_of(request).metadata,
            timeout=gateway_of(request).config.call_timeout,
        )
    except grpc.aio.AioRpcError as error:
        raise refusal_of(error) from None


def query(request: web.Request, msg: _Req) -> _Req:
    """``msg`` filled from the request's query parameters."""
    return from_query({key: request.query.getall(key) for key in request.query}, msg)


async def body(request: web.Request, msg: _Req) -> _Req:
    """``msg`` filled from the request's JSON body (``Content-Type: application/json``,
    which a form of another site cannot send without the browser asking the gateway first)."""
    if request.content_type != JSON:
        raise invalid("body", "JSON_REQUIRED", f"the body must be {JSON}")
    return from_json(await request.read(), msg)


def reply(msg: message.Message, status: int = 200) -> web.Response:
    return web.Response(body=to_json(msg), status=status, content_type=JSON)
