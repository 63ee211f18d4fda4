"""The tokens file: who each bearer token stands for.

A tokens file (TOML) names the principals: each has a token (or the SHA-256 of one), roles,
and optionally the owner ids it may touch. Tokens are never logged and never kept: only their
SHA-256 digests, compared with ``hmac.compare_digest`` against every entry so the time taken
does not depend on which entry (if any) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UPLOADER = "uploader"
VIEWER = "viewer"
ADMIN = "admin"
SERVICE = "service"
ROLES = frozenset({UPLOADER, VIEWER, ADMIN, SERVICE})

# A token shorter than this is guessable; the file is refused rather than served with it.
MIN_TOKEN_LENGTH = 16


class TokensFileError(RuntimeError):
    """The tokens file cannot be used; the message names the file and the entry, never a token."""


@dataclass(frozen=True)
class Principal:
    """Who a token stands for. ``owners`` None means every owner."""

    name: str
    roles: frozenset[str]
    owners: frozenset[str] | None = None


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
