"""Bearer-token authentication and role/owner authorisation, shared by both services.

A tokens file (TOML) names the principals: each has a token (or the SHA-256 of one), roles,
and optionally the owner ids it may touch. The :class:`AuthInterceptor` answers a call
without a known token ``UNAUTHENTICATED`` and a role the method's table does not allow
``PERMISSION_DENIED``; the principal it found travels to the servicer in a
:class:`contextvars.ContextVar`, where the owner checks happen (only the servicer knows whose
item a request touches). Without a tokens file there is no interceptor and no principal:
every check here passes, as before authentication existed.

Tokens are never logged and never kept: only their SHA-256 digests, compared with
``hmac.compare_digest`` against every entry so the time taken does not depend on which
entry (if any) matched.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import tomllib
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mediatag_common.errors import FieldViolation, PermissionDenied, Unauthenticated
from mediatag_common.interceptors import Behavior, BehaviorInterceptor

logger = logging.getLogger(__name__)

UPLOADER = "uploader"
VIEWER = "viewer"
ADMIN = "admin"
SERVICE = "service"
ROLES = frozenset({UPLOADER, VIEWER, ADMIN, SERVICE})

AUTHORIZATION = "authorization"
_BEARER = "bearer "
# Health and reflection stay open: load balancers and grpcurl use them without a token.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# A token shorter than this is guessable; the file is refused rather than served with it.
MIN_TOKEN_LENGTH = 16

MethodRoles = Mapping[str, frozenset[str]]


class TokensFileError(RuntimeError):
    """The tokens file cannot be used; the message names the file and the entry, never a token."""


@dataclass(frozen=True)
class Principal:
    """Who a token stands for. ``owners`` None means every owner."""

    name: str
    roles: frozenset[str]
    owners: frozenset[str] | None = None

    @property
    def restricted(self) -> bool:
        return self.owners is not None

    def may_see(self, owner_id: str) -> bool:
        return self.owners is None or owner_id in self.owners


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class TokenTable:
    """The principals of a tokens file, found by token in constant time."""

    def __init__(self, entries: Collection[tuple[bytes, Principal]]) -> None:
        self._entries = tuple(_Entry(digest, principal) for digest, principal in entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, or None; every entry is compared, found or not."""
        digest = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.principal
        return found


def load_tokens(path: Path) -> TokenTable:
    """Read a tokens file::

    [[tokens]]
    name = "uploader-app"          # logged instead of the token
    token = "…"                    # or token_sha256 = "<64 hex digits>"
    roles = ["uploader"]           # uploader, viewer, admin, service
    owners = ["listing-7"]         # optional; absent = every owner
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise TokensFileError(f"tokens file {path}: {error.strerror or error}") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise TokensFileError(f"tokens file {path} is not valid TOML: {error}") from error
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokensFileError(f"tokens file {path} has no [[tokens]] entries")
    entries: list[tuple[bytes, Principal]] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for index, raw in enumerate(tokens):
        where = f"tokens file {path}, entry {index + 1}"
        if not isinstance(raw, dict):
            raise TokensFileError(f"{where} is not a table")
        digest, principal = _entry(raw, where)
        if principal.name in names:
            raise TokensFileError(f"{where}: the name {principal.name!r} is used twice")
        if digest in digests:
            raise TokensFileError(f"{where} ({principal.name}): the same token as another entry")
        names.add(principal.name)
        digests.add(digest)
        entries.append((digest, principal))
    return TokenTable(entries)


def _entry(raw: dict[str, Any], where: str) -> tuple[bytes, Principal]:
    unknown = set(raw) - {"name", "token", "token_sha256", "roles", "owners"}
    if unknown:
        raise TokensFileError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise TokensFileError(f"{where}: a name is required")
    where = f"{where} ({name})"
    token, hashed = raw.get("token"), raw.get("token_sha256")
    if (token is None) == (hashed is None):
        raise TokensFileError(f"{where}: give either token or token_sha256")
    if token is not None:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise TokensFileError(f"{where}: a token needs at least {MIN_TOKEN_LENGTH} characters")
        digest = hashlib.sha256(token.encode()).digest()
    else:
        try:
            digest = bytes.fromhex(hashed) if isinstance(hashed, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise TokensFileError(f"{where}: token_sha256 must be 64 hex digits")
    roles = raw.get("roles")
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise TokensFileError(f"{where}: roles must be a list of {', '.join(sorted(ROLES))}")
    if bad := set(roles) - ROLES:
        raise TokensFileError(f"{where}: unknown roles {', '.join(sorted(bad))}")
    owners = raw.get("owners")
    if owners is not None and (
        not isinstance(owners, list) or not all(isinstance(o, str) and o for o in owners)
    ):
        raise TokensFileError(f"{where}: owners must be a list of owner ids")
    return digest, Principal(
        name=name,
        roles=frozenset(roles),
        owners=None if owners is None else frozenset(owners),
    )


# ---- the principal of the call being served ----

_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "mediatag_principal", default=None
)


def current_principal() -> Principal | None:
    """The principal of the call being served; None when authentication is off."""
    return _CURRENT.get()


def owner_denied(owner_id: str, field: str = "owner_id") -> PermissionDenied:
    return PermissionDenied(
        f"this token may not touch owner {owner_id!r}",
        reason="OWNER_NOT_ALLOWED",
        field_violations=[FieldViolation(field, "owner not allowed for this token")],
    )


def check_owner(owner_id: str, field: str = "owner_id") -> None:
    """Refuse an owner the caller may not touch (an empty one is left to validation)."""
    principal = _CURRENT.get()
    if principal is not None and owner_id and not principal.may_see(owner_id):
        raise owner_denied(owner_id, field)


def check_item(owner_id: str | None, item_id: str, field: str) -> None:
    """Refuse an item of another owner, and an unknown item (``owner_id`` None) alike, so an
    owner-restricted caller cannot tell the two apart; others see unknown items as before."""
    principal = _CURRENT.get()
    if principal is None or not principal.restricted:
        return
    if owner_id is None or not principal.may_see(owner_id):
        raise PermissionDenied(
            f"this token may not read {item_id!r}",
            reason="OWNER_NOT_ALLOWED",
            field_violations=[FieldViolation(field, "not allowed for this token")],
        )


def allowed_owners() -> frozenset[str] | None:
    """The owners the caller may see; None for every owner."""
    principal = _CURRENT.get()
    return None if principal is None else principal.owners


def implicit_owner(owner_id: str, field: str = "owner_id") -> str:
    """The owner filter of a list call: the one asked for (checked), else the caller's only
    owner. A caller restricted to several owners must name one (the queries filter by one)."""
    check_owner(owner_id, field)
    owners = allowed_owners()
    if owner_id or owners is None:
        return owner_id
    if len(owners) == 1:
        return next(iter(owners))
    raise PermissionDenied(
        "this token may see several owners but not all: name one in owner_id",
        reason="OWNER_NOT_ALLOWED",
        field_violations=[FieldViolation(field, "required for this token")],
    )


# ---- the server side ----


def _bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION:
            text = value.decode() if isinstance(value, bytes) else value
            if text[: len(_BEARER)].lower() == _BEARER:
                return text[len(_BEARER) :].strip()
            return ""
    return None


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
        token = _bearer_token(context)
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
            token = _CURRENT.set(self._authorise(method, context))
            try:
                return await behavior(request, context)
            finally:
                _CURRENT.reset(token)

        return wrapper

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        if method.startswith(OPEN_SERVICES):
            return behavior

        async def wrapper(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            # Set, not reset: each call is served in its own task (its own context), and a
            # generator may be finalised in another context, where a reset would fail.
            _CURRENT.set(self._authorise(method, context))
            async for response in behavior(request, context):
                yield response

        return wrapper


# ---- the client side ----


def _with_token(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), header)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TokenInterceptor:
    """Adds ``authorization: Bearer <token>`` to every call of a channel.

    Metadata rather than call credentials, which gRPC sends only over TLS: the services may
    call each other in plaintext on loopback.
    """

    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<token hidden>)"


class _UnaryUnaryToken(_TokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._header), request)


class _UnaryStreamToken(_TokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._header), request)


class _StreamUnaryToken(_TokenInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._header), requests)


class _StreamStreamToken(_TokenInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._header), requests)


def token_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor]:
    """The client interceptors that send ``token`` with every call (none for no token).

    One per kind of call: grpc.aio files an interceptor under the first kind it implements.
    """
    if not token:
        return []
    return [
        _UnaryUnaryToken(token),
        _UnaryStreamToken(token),
        _StreamUnaryToken(token),
        _StreamStreamToken(token),
    ]
