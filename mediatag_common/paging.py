"""AIP-158 paging: page sizes, and page tokens that are opaque and authenticated.

A token carries the key of the last item of its page, for the next page to resume after, and
an HMAC-SHA256 over that key and the filters of the listing, with a secret of the service's
database: a token cannot be forged (a key of one's choosing never reaches a query), nor used
for other filters. The key is type-checked all the same on the way back. Replicas of a service
that share a database share its secret, so each accepts the others' tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from collections.abc import Mapping, Sequence

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
# Keys are made of these: an int is a 64-bit integer, a float a finite number.
KeyPart = int | float | str
_INT64 = 2**63
_MAC_BYTES = 16
_VERSION = b"1"


class InvalidPageToken(ValueError):
    """The token is not one this listing issued for these filters."""


class InvalidPageSize(ValueError):
    """The page size is negative."""


def page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is clamped (AIP-158)."""
    if requested < 0:
        raise InvalidPageSize("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _unpadded(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _padded(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Issues and verifies the page tokens of one service; ``secret`` is its database's."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a page token secret needs at least 16 bytes")
        self._secret = secret

    def _mac(self, key: bytes, filters: Mapping[str, KeyPart]) -> bytes:
        canonical = json.dumps(filters, sort_keys=True, separators=(",", ":")).encode()
        message = _VERSION + len(key).to_bytes(4, "big") + key + canonical
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, last_key: Sequence[KeyPart], filters: Mapping[str, KeyPart]) -> str:
        """A token that resumes after ``last_key`` for the same ``filters``."""
        key = json.dumps(list(last_key), separators=(",", ":")).encode()
        return _unpadded(self._mac(key, filters) + key)

    def resume_after(
        self, token: str, filters: Mapping[str, KeyPart], shape: Sequence[type]
    ) -> tuple[KeyPart, ...] | None:
        """The key to resume after, of the types ``shape`` lists; None for an empty token
        (the first page). Raises InvalidPageToken for anything else."""
        if not token:
            return None
        try:
            raw = _padded(token)
        except (binascii.Error, ValueError) as exc:
            raise InvalidPageToken("page_token is not one this listing issued") from exc
        mac, key = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(key, filters)):
            raise InvalidPageToken("page_token is not one this listing issued (for these filters)")
        try:
            parts = json.loads(key)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidPageToken("page_token is malformed") from exc
        if not isinstance(parts, list) or len(parts) != len(shape):
            raise InvalidPageToken("page_token is malformed")
        return tuple(_checked(part, kind) for part, kind in zip(parts, shape, strict=True))


def _checked(part: object, kind: type) -> KeyPart:
    # bool is an int to Python, never to a key.
    if kind is int and isinstance(part, int) and not isinstance(part, bool):
        if -_INT64 <= part < _INT64:
            return part
    elif kind is float and isinstance(part, int | float) and not isinstance(part, bool):
        if math.isfinite(part):
            return float(part)
    elif kind is str and isinstance(part, str):
        return part
    raise InvalidPageToken("page_token is malformed")
