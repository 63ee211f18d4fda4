"""Refusals as HTTP responses: ``google.rpc.Status`` JSON under the usual gRPC -> HTTP mapping.

The one table from ``google.rpc.Code`` to HTTP status is here (the mapping grpc-gateway and
Google's HTTP APIs use), and beside it the few HTTP errors aiohttp raises itself, turned into
refusals of the same form; the body is the status in the proto3 JSON mapping, details included
(``@type`` names the detail, ``ErrorInfo`` and ``BadRequest`` as AIP-193 has them).
"""

from __future__ import annotations

from aiohttp import web
from google.rpc import code_pb2

from web_gateway.errors import Refusal
from web_gateway.protojson import to_json

_HTTP_STATUS = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}


def http_status(refusal: Refusal) -> int:
    return _HTTP_STATUS.get(refusal.code, 500)


def body(refusal: Refusal) -> bytes:
    return to_json(refusal.status)


# aiohttp's own answers (no route, wrong method, body too large) in the API's error form.
_CODES_OF_HTTP_ERRORS = {
    404: code_pb2.NOT_FOUND,
    405: code_pb2.UNIMPLEMENTED,
    413: code_pb2.INVALID_ARGUMENT,
}


def from_http(error: web.HTTPException) -> Refusal | None:
    """``error`` as a refusal, if it is one aiohttp raises itself; None: any other."""
    code = _CODES_OF_HTTP_ERRORS.get(error.status)
    if code is None:
        return None
    return Refusal.of(code, "HTTP_" + str(error.status), error.reason)
