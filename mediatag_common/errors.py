"""The root of both services' exception trees, the refusals they share, and reading a
refusal back on the client side.

Every refusal a client can act on is a :class:`ServiceError`: a ``reason`` (the AIP-193
``ErrorInfo.reason``), a message for the client, the fields at fault and ErrorInfo metadata.
The classes carry no gRPC status codes: the gRPC layer maps each class to its code in a table
(:mod:`mediatag_common.status` for the classes here, one beside each service's servicer for
its own). This module imports no gRPC, so the domain may raise these freely.

The tree::

    ServiceError                  any refusal; INTERNAL unless a table says otherwise
    ├── Unauthenticated           TOKEN_MISSING, TOKEN_INVALID
    ├── PermissionDenied          ROLE_NOT_ALLOWED, OWNER_NOT_ALLOWED
    ├── MalformedRequest          a request message that does not decode
    ├── RequestTooLarge           a streaming call's request over its size limit
    ├── RequestTooSlow            a request message that took too long to arrive
    ├── ServerBusy                no room to read one more request message
    ├── TooManyCalls              as many calls in progress as the service serves at once
    ├── AnalysisError             the analysis service's tree (analysis_service.errors)
    └── IngestError               the ingest service's tree (ingest_service.errors)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    import grpc

DOMAIN = "mediatag"
# The trailer a status's AIP-193 details travel in.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# WatchStatus refusals (OUT_OF_RANGE) after which a client starts over from the current state
# (send_initial_state): its revision was compacted away, or belongs to a replaced event log.
REVISION_AHEAD = "REVISION_AHEAD"
RESYNC_REASONS = frozenset({"REVISION_COMPACTED", REVISION_AHEAD})


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field, named by its path in the request (e.g. ``files[3].content``)."""

    field: str
    description: str


class ServiceError(Exception):
    """A refusal a client can act on; each service derives its own root from this.

    ``reason`` is a class default that subclasses override; an instance may override it for
    one refusal. ``message`` is what the client reads: it never names a server path, SQL or
    an exception. The failure behind a refusal is chained as its cause (``raise ... from``);
    ``str()`` of the refusal, which the logs use, adds it.
    """

    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field_violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.field_violations = tuple(field_violations)
        self.metadata = dict(metadata or {})

    def __str__(self) -> str:
        cause = self.__cause__
        return self.message if cause is None else f"{self.message} ({cause})"

    @classmethod
    def for_field(cls, field: str, reason: str, description: str) -> Self:
        """A refusal of one field (e.g. ``files[2].content``), saying what is wrong with it."""
        return cls(
            f"{field}: {description}",
            reason=reason,
            field_violations=[FieldViolation(field, description)],
        )


class Unauthenticated(ServiceError):
    """No token, or one the tokens file does not know."""

    reason = "TOKEN_INVALID"


class PermissionDenied(ServiceError):
    """A known principal asked for something its roles or owners do not cover."""

    reason = "ROLE_NOT_ALLOWED"


class MalformedRequest(ServiceError):
    """A request message that is not the protobuf message of its method."""

    reason = "MALFORMED_REQUEST"


class RequestTooLarge(ServiceError):
    """The request of a call that streams its answer is larger than such a request may be."""

    reason = "REQUEST_TOO_LARGE"


class RequestTooSlow(ServiceError):
    """A request message that did not arrive in time: the call held memory meanwhile."""

    reason = "REQUEST_TOO_SLOW"


class ServerBusy(ServiceError):
    """The request messages being read and served already take all the room allowed."""

    reason = "SERVER_BUSY"


class TooManyCalls(ServiceError):
    """The service serves as many calls at once as it may."""

    reason = "TOO_MANY_CALLS"


# How many items of a list a refusal names, and how much of each: a status travels in gRPC
# trailers, which a default client refuses beyond 16 KiB (150 unknown ids reached that).
LISTED_ITEMS = 5
LISTED_ITEM_CHARACTERS = 64


def listed(items: Sequence[str]) -> str:
    """The first few of ``items`` for a refusal's message, and how many more there are."""
    shown = [
        item if len(item) <= LISTED_ITEM_CHARACTERS else item[: LISTED_ITEM_CHARACTERS - 1] + "…"
        for item in items[:LISTED_ITEMS]
    ]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


# ---- reading a refusal back (clients and tests) ----


def _status_details(error: grpc.RpcError) -> status_pb2.Status | None:
    trailers = getattr(error, "trailing_metadata", None)
    for key, value in (trailers() if trailers is not None else None) or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo carried by a failed call, if any (for clients and tests)."""
    status = _status_details(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """The BadRequest field violations carried by a failed call."""
    status = _status_details(error)
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
