"""Opaque AIP-158 page tokens bound to the filter they were issued for."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


class InvalidPageToken(ValueError):
    """The token is malformed, or was issued for another filter."""


class InvalidPageSize(ValueError):
    """The page size is negative."""


def page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is clamped (AIP-158)."""
    if requested < 0:
        raise InvalidPageSize("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _filter_digest(filters: Mapping[str, Any]) -> str:
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode(last_key: Sequence[Any], filters: Mapping[str, Any]) -> str:
    """A token that resumes after ``last_key`` for the same ``filters``."""
    payload = {"k": list(last_key), "f": _filter_digest(filters)}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, filters: Mapping[str, Any]) -> list[Any] | None:
    """The key to resume after, or None for an empty token (first page)."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidPageToken("page_token is malformed") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("k"), list):
        raise InvalidPageToken("page_token is malformed")
    if payload.get("f") != _filter_digest(filters):
        raise InvalidPageToken("page_token was issued for a different filter")
    key: list[Any] = payload["k"]
    return key
