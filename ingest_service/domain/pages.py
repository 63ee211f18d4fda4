"""One page of a listing (AIP-158): its size checked, its token verified, the next one issued.

Shared by the ingest service's listings (media, webhook deliveries); the tokens are
``mediatag_common.paging``'s, signed for the listing's filters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from ingest_service.errors import invalid
from mediatag_common import paging

T = TypeVar("T")
# The key of the last item a page ended with (None: the first page).
Key = tuple[paging.KeyPart, ...]


async def one_page(
    tokens: paging.PageTokens,
    *,
    page_size: int,
    page_token: str,
    filters: Mapping[str, paging.KeyPart],
    shape: Sequence[type],
    fetch: Callable[[Key | None, int], Awaitable[Sequence[T]]],
    key_of: Callable[[T], Sequence[paging.KeyPart]],
) -> tuple[tuple[T, ...], str]:
    """The items of one page and the token of the next ("" on the last page).

    ``fetch(after, limit)`` returns up to ``limit`` items in listing order after the key
    ``after`` (of the types ``shape`` lists); ``key_of`` gives an item's key. Refuses a bad
    size (``page_size``) or a token not issued for these ``filters`` (``page_token``).
    """
    try:
        limit = paging.page_size(page_size)
    except paging.InvalidPageSize as exc:
        raise invalid("page_size", "INVALID_PAGE_SIZE", str(exc)) from exc
    try:
        after = tokens.resume_after(page_token, filters, shape)
    except paging.InvalidPageToken as exc:
        raise invalid("page_token", "INVALID_PAGE_TOKEN", str(exc)) from exc
    # One more than a page tells whether another follows.
    found = await fetch(after, limit + 1)
    page = tuple(found[:limit])
    token = tokens.issue(key_of(page[-1]), filters) if len(found) > limit else ""
    return page, token
