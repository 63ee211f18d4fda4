"""Refusals as ``google.rpc.Status`` messages: the gateway's own, and the services' passed on.

The gateway speaks the services' error model (AIP-193: one ``ErrorInfo``, plus ``BadRequest``
for bad input) whether a refusal is its own or came from upstream, so an HTTP client reads
both the same way. Codes are ``google.rpc.Code`` numbers; the HTTP layer maps them to HTTP
statuses in one table (``web_gateway.api.errors``).

One class, :class:`Refusal`, carries every refusal: a service's, passed on as it came, or the
gateway's own, each made by one of these (their code is chosen here and nowhere else)::

    invalid           INVALID_ARGUMENT     bad input, naming the field
    unauthenticated   UNAUTHENTICATED      no caller, or a token not valid
    denied            PERMISSION_DENIED    a caller not allowed this (owner, origin, host, CSRF)
    precondition      FAILED_PRECONDITION  asked of a gateway not set up for it
    exhausted         RESOURCE_EXHAUSTED   a bound reached
    unavailable       UNAVAILABLE          not now (closing, upstream answered nothing)
    internal          INTERNAL             something unexpected, told without its details

aiohttp's own answers on the API (no route, wrong method, body too large) become refusals in
``web_gateway.api.errors``, beside the table of HTTP statuses.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from mediatag_common.errors import DOMAIN, RESYNC_REASONS

# Refusals after which a watch starts again from where it was: the service was restarting,
# draining, overloaded, or cut the watch off as too slow.
_TRANSIENT_CODES = frozenset(
    {
        code_pb2.UNAVAILABLE,
        code_pb2.RESOURCE_EXHAUSTED,
        code_pb2.DEADLINE_EXCEEDED,
        code_pb2.CANCELLED,
        code_pb2.ABORTED,
        code_pb2.INTERNAL,
        code_pb2.UNKNOWN,
    }
)


class Refusal(Exception):
    """A refusal to pass on to the client, carried as its ``google.rpc.Status``."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status

    @classmethod
    def of(
        cls,
        code: int,
        reason: str,
        message: str,
        *,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Refusal:
        """A refusal of the gateway's own: ``code`` a ``google.rpc.Code`` number."""
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
        details = [info]
        if field is not None:
            bad_request = any_pb2.Any()
            bad_request.Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=field, description=message
                        )
                    ]
                )
            )
            details.append(bad_request)
        return cls(status_pb2.Status(code=code, message=message, details=details))

    @property
    def code(self) -> int:
        return int(self.status.code)

    @property
    def info(self) -> error_details_pb2.ErrorInfo | None:
        for detail in self.status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info
        return None

    @property
    def reason(self) -> str:
        info = self.info
        return info.reason if info is not None else ""

    @property
    def transient(self) -> bool:
        """Worth trying again as it was (the service was away or busy)."""
        return self.code in _TRANSIENT_CODES

    @property
    def resync(self) -> bool:
        """The revision asked for is gone (or never was): start over from the current state."""
        return self.code == code_pb2.OUT_OF_RANGE and self.reason in RESYNC_REASONS


def invalid(field: str, reason: str, message: str) -> Refusal:
    """Bad input: INVALID_ARGUMENT naming the field."""
    return Refusal.of(code_pb2.INVALID_ARGUMENT, reason, message, field=field)


def unauthenticated(reason: str, message: str) -> Refusal:
    """No caller, or a token not valid: UNAUTHENTICATED."""
    return Refusal.of(code_pb2.UNAUTHENTICATED, reason, message)


def denied(reason: str, message: str, *, field: str | None = None) -> Refusal:
    """A caller not allowed what it asked: PERMISSION_DENIED (naming the field, if one)."""
    return Refusal.of(code_pb2.PERMISSION_DENIED, reason, message, field=field)


def precondition(reason: str, message: str) -> Refusal:
    """Asked of a gateway not set up for it: FAILED_PRECONDITION."""
    return Refusal.of(code_pb2.FAILED_PRECONDITION, reason, message)


def exhausted(reason: str, message: str, **metadata: str) -> Refusal:
    """A bound reached: RESOURCE_EXHAUSTED, with the bound in the metadata."""
    return Refusal.of(code_pb2.RESOURCE_EXHAUSTED, reason, message, metadata=metadata)


def unavailable(reason: str, message: str) -> Refusal:
    """Not now: UNAVAILABLE."""
    return Refusal.of(code_pb2.UNAVAILABLE, reason, message)


def internal() -> Refusal:
    """Something unexpected, told without its details: INTERNAL."""
    return Refusal.of(code_pb2.INTERNAL, "INTERNAL", "internal error")
