"""Who is calling: a bearer token, or a browser session's cookie; and CSRF protection.

With a tokens file every API call needs either ``Authorization: Bearer <token>`` (checked
here against the file, then passed on to the services, which check its roles and owners) or
the session cookie the page got for its token. A state-changing call authenticated by the
cookie (which the browser sends by itself, whichever page asks) must also carry the
session's CSRF token in ``X-CSRF-Token``, and an ``Origin``, when the browser sends one,
must be the gateway's own. Without a tokens file nobody signs in: a request a browser sends
(it says so with ``Origin`` or ``Sec-Fetch-Site``) needs the one CSRF token of everyone,
which the page gets from ``GET /api/v1/session`` and no other origin can read; programs
(curl, other servers) call as they would a gRPC port without a token.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from aiohttp import web

from mediatag_common import callers
from mediatag_common.auth import SERVICE, Principal, TokenTable
from mediatag_common.grpc_server import is_loopback
from web_gateway.domain.sessions import Session, SessionStore
from web_gateway.errors import denied, unauthenticated
from web_gateway.upstream import Metadata, credentials

SESSION_COOKIE = "mediatag_session"
_CSRF_HEADER = "X-CSRF-Token"
_BEARER = "bearer "
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Caller:
    """The principal of a request (None without a tokens file), the token its calls to the
    services carry, and who holds what it takes of the gateway's shared bounds (uploads,
    event streams): its principal, or without one its peer address."""

    principal: Principal | None
    token: str | None = field(default=None, repr=False)
    session: Session | None = None
    holder: callers.Caller = callers.ANONYMOUS

    @property
    def metadata(self) -> Metadata:
        return credentials(self.token)


def _holder(principal: Principal | None, request: web.Request) -> callers.Caller:
    if principal is not None:
        return callers.Caller(principal.name, SERVICE in principal.roles)
    return callers.Caller(f"peer:{request.remote or ''}")


class Callers:
    """Finds the caller of each request and guards state-changing ones."""

    def __init__(
        self, *, tokens: TokenTable | None, sessions: SessionStore, open_csrf_token: str
    ) -> None:
        self.tokens = tokens
        self.sessions = sessions
        # The CSRF token of everyone when nobody signs in (no tokens file).
        self.open_csrf_token = open_csrf_token

    def identify(self, request: web.Request) -> Caller:
        """The caller of ``request``; refused (401) when a tokens file asks for one and
        there is none, or it is not valid."""
        header = request.headers.get("Authorization")
        if header is not None:
            if header[: len(_BEARER)].lower() != _BEARER:
                raise unauthenticated("TOKEN_INVALID", "only Bearer tokens are taken")
            token = header[len(_BEARER) :].strip()
            if self.tokens is None:
                return Caller(None, token, holder=_holder(None, request))
            principal = self.tokens.authenticate(token)
            if principal is None:
                raise unauthenticated("TOKEN_INVALID", "the bearer token is not valid")
            return Caller(principal, token, holder=_holder(principal, request))
        if self.tokens is None:
            return Caller(None, holder=_holder(None, request))
        session_id = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(session_id) if session_id else None
        if session is None:
            raise unauthenticated(
                "TOKEN_MISSING" if session_id is None else "SESSION_EXPIRED",
                "sign in with a token (POST /api/v1/session) or send "
                "'Authorization: Bearer <token>'",
            )
        return Caller(
            session.principal, session.token, session, _holder(session.principal, request)
        )

    def check_csrf(self, request: web.Request, caller: Caller) -> None:
        """Refuse a state-changing request the browser may have been tricked into sending."""
        if request.method in _SAFE_METHODS or "Authorization" in request.headers:
            return
        check_origin(request)
        if caller.session is None and not _from_browser(request):
            return
        expected = caller.session.csrf_token if caller.session else self.open_csrf_token
        given = request.headers.get(_CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise denied(
                "CSRF_TOKEN_INVALID",
                f"a state-changing request needs the {_CSRF_HEADER} header of its session",
            )


def _from_browser(request: web.Request) -> bool:
    return "Origin" in request.headers or "Sec-Fetch-Site" in request.headers


def check_origin(request: web.Request) -> None:
    """Refuse a request whose browser says it comes from another origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    own = f"{request.scheme}://{request.host}"
    if origin != own:
        raise denied("CROSS_ORIGIN", f"requests from {origin} are not accepted")


def check_host(request: web.Request, bound_host: str) -> None:
    """Without a tokens file on loopback, only loopback names may be asked for: a page of
    another site whose name resolves to 127.0.0.1 (DNS rebinding) is not the gateway's own
    origin, and its requests are refused."""
    host = request.url.host or ""
    if is_loopback(host) or host == bound_host:
        return
    raise denied("HOST_NOT_ALLOWED", f"this gateway answers to loopback names, not {host!r}")
