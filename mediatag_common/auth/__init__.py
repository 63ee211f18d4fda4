"""Bearer-token authentication and role/owner authorisation, shared by both services.

- :mod:`~mediatag_common.auth.tokens`: the tokens file and the principals it names;
- :mod:`~mediatag_common.auth.interceptor`: the server interceptor that authenticates each
  call and checks its role against the method's table;
- :mod:`~mediatag_common.auth.scope`: the caller of the call being served and the owners it
  may touch (the servicers' owner checks);
- :mod:`~mediatag_common.auth.credentials`: the client side, a token sent with every call.
"""

from mediatag_common.auth.credentials import token_interceptors
from mediatag_common.auth.interceptor import AuthInterceptor, MethodRoles
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
    "owner_scope",
    "token_interceptors",
]
