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


def _bearer_token(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The call's bearer token; "" for another scheme, None for none. Two headers are refused:
    which one a proxy or a service reads would otherwise decide who the caller is."""
    headers = [value for key, value in context.invocation_metadata() or () if key == AUTHORIZATION]
    if len(headers) > 1:
        logger.warning("refused %s from %s: several authorization headers", method, context.peer())
        raise Unauthenticated("one 'authorization' header at most", reason="TOKEN_INVALID")
    if not headers:
        return None
    text = headers[0].decode() if isinstance(headers[0], bytes) else headers[0]
    if text[: len(_BEARER)].lower() == _BEARER:
        return text[len(_BEARER) :].strip()
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

    def _authorise(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        token = _bearer_token(method, context)
        if token is None:
            logger.info("refused %s from %s: no bearer token", method, context.peer())
            raise Unauthenticated(
                "this service needs an 'authorization: Bearer <token>' header",
                reason="TOKEN_MISSING",
            )
        principal = self._tokens.authenticate(token)
        if principal is None:
            logger.warning("refused %s from %s: unknown token", method, context.peer())
            raise Unauthenticated("the bearer token is not valid", reason="TOKEN_INVALID")
        allowed = self._method_roles.get(method, frozenset()) | {ADMIN}
        if not principal.roles & allowed:
            logger.warning("refused %s to %s: role not allowed", method, principal.name)
            raise PermissionDenied(
                f"{method.rsplit('/', 1)[-1]} needs one of the roles {', '.join(sorted(allowed))}",
                reason="ROLE_NOT_ALLOWED",
            )
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
