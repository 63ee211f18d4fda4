"""Bearer-token authentication and role/owner authorisation, shared by both services.

- :mod:`~mediatag_common.auth.tokens`: the tokens file and the principals it names;
- :mod:`~mediatag_common.auth.interceptor`: the server interceptor that authenticates each
  call and checks its role against the method's table;
- :mod:`~mediatag_common.auth.roles`: who may call what of the ingest service (the web
  gateway checks uploads against it too);
- :mod:`~mediatag_common.auth.scope`: the caller of the call being served and the owners it
  may touch (the servicers' owner checks);
- :mod:`~mediatag_common.auth.credentials`: the client side, a token sent with every call.
"""

from mediatag_common.auth.credentials import token_interceptors
from mediatag_common.auth.interceptor import (
    AuthInterceptor,
    MethodRoles,
    may_call,
    role_not_allowed,
)
from mediatag_common.auth.roles import INGEST_METHOD_ROLES, INGEST_SERVICE
from mediatag_common.auth.scope import (
    OwnerScope,
    current_caller,
    current_principal,
    owner_scope,
)
from mediatag_common.auth.tokens import (
    ADMIN,
    ROLES,
    SERVICE,
    UPLOADER,
    VIEWER,
    Principal,
    TokensFileError,
    TokenTable,
    load_tokens,
)

__all__ = [
    "ADMIN",
    "INGEST_METHOD_ROLES",
    "INGEST_SERVICE",
    "ROLES",
    "SERVICE",
    "UPLOADER",
    "VIEWER",
    "AuthInterceptor",
    "MethodRoles",
    "OwnerScope",
    "Principal",
    "TokenTable",
    "TokensFileError",
    "current_caller",
    "current_principal",
    "load_tokens",
    "may_call",
    "owner_scope",
    "role_not_allowed",
    "token_interceptors",
]
