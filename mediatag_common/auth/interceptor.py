"""The server side: every call but health and reflection authenticated, its role checked.

The :class:`AuthInterceptor` answers a call without a known token ``UNAUTHENTICATED`` and a
role the method's table does not allow ``PERMISSION_DENIED``; the principal it found is the
caller of :mod:`mediatag_common.auth.scope` for the rest of the call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from mediatag_common.auth.scope import set_principal
from mediatag_common.auth.tokens import ADMIN, Principal, TokenTable
from mediatag_common.errors import PermissionDenied, Unauthenticated
from mediatag_common.interceptors import Behavior, BehaviorInterceptor
from mediatag_common.log_limits import RateLimitedLog

logger = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
_BEARER = "bearer "
# Health and reflection stay open: load balancers and grpcurl use them without a token.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# Full method names (``/pkg.Service/Method``) -> the roles that may call them.
MethodRoles = Mapping[str, frozenset[str]]
# At most one line per kind of refusal and method every this many seconds.
REFUSAL_LOG_INTERVAL = 10.0


def allowed_roles(method_roles: MethodRoles, method: str) -> frozenset[str]:
    """The roles that may call ``method``: its table's, and admin (alone, for a method the
    table does not list)."""
    return method_roles.get(method, frozenset()) | {ADMIN}


def may_call(principal: Principal, method_roles: MethodRoles, method: str) -> bool:
    return bool(principal.roles & allowed_roles(method_roles, method))


def role_not_allowed(method_roles: MethodRoles, method: str) -> PermissionDenied:
    """The refusal of a caller whose roles may not call ``method``."""
    allowed = allowed_roles(method_roles, method)
    return PermissionDenied(
        f"{method.rsplit('/', 1)[-1]} needs one of the roles {', '.join(sorted(allowed))}",
        reason="ROLE_NOT_ALLOWED",
    )


def _bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str | list[str] | None:
    """The call's bearer token; "" for another scheme, None for none, and every header when
    there are several (refused: which one a proxy or a service reads would otherwise decide
    who the caller is)."""
    headers = [value for key, value in context.invocation_metadata() or () if key == AUTHORIZATION]
    texts = [value.decode() if isinstance(value, bytes) else value for value in headers]
    if len(texts) > 1:
        return texts
    if not texts:
        return None
    if texts[0][: len(_BEARER)].lower() == _BEARER:
        return texts[0][len(_BEARER) :].strip()
    return ""


class AuthInterceptor(BehaviorInterceptor):
    """Authenticates every call but health and reflection, and checks its role.

    It runs inside the error mapping, so its refusals are AIP-193 statuses like any other.
    ``method_roles`` maps full method names (``/pkg.Service/Method``) to the roles that may
    call them; ``admin`` may call everything, and a method not in the table only ``admin``.
    """

    def __init__(self, tokens: TokenTable, method_roles: MethodRoles) -> None:
        self._tokens = tokens
        self._method_roles = method_roles
        # Anyone who reaches the port can make us refuse: at most one line per kind of
        # refusal, method (and principal) every interval, so a flood neither fills the disk
        # nor hides the other kinds. Keys from the servicers' methods and the tokens file only.
        self._refusal_log = RateLimitedLog(logger, REFUSAL_LOG_INTERVAL)

    def _refused(self, level: int, method: str, why: str, who: str, key: str = "") -> None:
        self._refusal_log.log(level, f"{why} {method} {key}", "refused %s %s: %s", method, who, why)

    def _authorise(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        token = _bearer_token(context)
        if token is None:
            self._refused(logging.INFO, method, "no bearer token", f"from {context.peer()}")
            raise Unauthenticated(
                "this service needs an 'authorization: Bearer <token>' header",
                reason="TOKEN_MISSING",
            )
        if isinstance(token, list):
            why = "several authorization headers"
            self._refused(logging.WARNING, method, why, f"from {context.peer()}")
            raise Unauthenticated("one 'authorization' header at most", reason="TOKEN_INVALID")
        principal = self._tokens.authenticate(token)
        if principal is None:
            self._refused(logging.WARNING, method, "unknown token", f"from {context.peer()}")
            raise Unauthenticated("the bearer token is not valid", reason="TOKEN_INVALID")
        if not may_call(principal, self._method_roles, method):
            why = "role not allowed"
            self._refused(logging.WARNING, method, why, f"to {principal.name}", principal.name)
            raise role_not_allowed(self._method_roles, method)
        return principal

    def wrap_unary(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        if method.startswith(OPEN_SERVICES):
            return behavior

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            set_principal(self._authorise(method, context))
            return await behavior(request, context)

        return wrapper

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        if method.startswith(OPEN_SERVICES):
            return behavior

        async def wrapper(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            set_principal(self._authorise(method, context))
            async for response in behavior(request, context):
                yield response

        return wrapper
