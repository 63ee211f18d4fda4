"""``/api/v1/session``: a browser trades its token for a session cookie, once.

``POST`` with ``{"token": "..."}`` signs in: the answer sets an ``HttpOnly``,
``SameSite=Strict`` cookie (``Secure`` over TLS) and tells who the token stands for and the
CSRF token state-changing requests must carry. ``GET`` tells the same for the session (or
bearer token) the request has, and whether the gateway asks for tokens at all; ``DELETE``
signs out.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from web_gateway.api.callers import SESSION_COOKIE, Caller, check_origin
from web_gateway.api.context import JSON, caller_of, gateway_of
from web_gateway.errors import invalid, precondition, unauthenticated

PATH = "/api/v1/session"


def _describe(caller: Caller, csrf_token: str, *, authentication: bool) -> web.Response:
    principal = caller.principal
    described: dict[str, Any] = {"authentication": authentication, "csrfToken": csrf_token}
    if principal is not None:
        described["principal"] = {
            "name": principal.name,
            "roles": sorted(principal.roles),
            "owners": None if principal.owners is None else sorted(principal.owners),
        }
    return web.Response(text=json.dumps(described), content_type=JSON)


async def describe(request: web.Request) -> web.Response:
    callers = gateway_of(request).callers
    caller = callers.identify(request)
    if caller.session is not None:
        csrf_token = caller.session.csrf_token
    elif callers.tokens is None:
        csrf_token = callers.open_csrf_token
    else:
        # A bearer token in a header needs no CSRF token.
        csrf_token = ""
    return _describe(caller, csrf_token, authentication=callers.tokens is not None)


async def sign_in(request: web.Request) -> web.Response:
    gateway = gateway_of(request)
    callers = gateway.callers
    check_origin(request)
    if request.content_type != JSON:
        raise invalid("body", "JSON_REQUIRED", f"the body must be {JSON}")
    if callers.tokens is None:
        raise precondition(
            "AUTHENTICATION_OFF",
            "this gateway has no tokens file: nobody needs to sign in",
        )
    try:
        token = json.loads(await request.read()).get("token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        raise invalid("token", "TOKEN_REQUIRED", 'the body is {"token": "..."}')
    principal = callers.tokens.authenticate(token)
    if principal is None:
        raise unauthenticated("TOKEN_INVALID", "the token is not valid")
    session_id, session = callers.sessions.create(principal, token)
    response = _describe(Caller(principal, token, session), session.csrf_token, authentication=True)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=gateway.config.tls is not None,
    )
    return response


async def sign_out(request: web.Request) -> web.Response:
    caller = caller_of(request)
    session_id = request.cookies.get(SESSION_COOKIE)
    if caller.session is not None and session_id:
        gateway_of(request).callers.sessions.delete(session_id)
    response = web.Response(status=204)
    response.del_cookie(SESSION_COOKIE, path="/")
    return response
