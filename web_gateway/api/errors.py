"""Refusals as HTTP responses: ``google.rpc.Status`` JSON under the usual gRPC -> HTTP mapping.

The one table from ``google.rpc.Code`` to HTTP status is here (the mapping grpc-gateway and
Google's HTTP APIs use); the body is the status in the proto3 JSON mapping, details included
(``@type`` names the detail, ``ErrorInfo`` and ``BadRequest`` as AIP-193 has them).
"""

from __future__ import annotations

from google.rpc import code_pb2

from web_gateway.errors import Refusal
from web_gateway.protojson import to_json

HTTP_STATUS = {
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
    return HTTP_STATUS.get(refusal.code, 500)


def body(refusal: Refusal) -> bytes:
    return to_json(refusal.status)
