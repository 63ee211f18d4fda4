"""Status events as the gateway passes them on, and the upstream they come from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class WatchFilter:
    """What one shared upstream watch selects, as ``WatchStatus`` does: an owner, media ids
    (empty: every owner, every item)."""

    owner_id: str = ""
    media_ids: frozenset[str] = frozenset()

    def __str__(self) -> str:
        """For logs: short whatever the number of media ids."""
        owner = f"owner {self.owner_id!r}" if self.owner_id else "every owner"
        return f"{owner}, {len(self.media_ids)} media id(s)" if self.media_ids else owner


@dataclass(frozen=True, slots=True)
class Change:
    """One status change, rendered once (``data``: its ``WatchStatusResponse`` as JSON) for
    every client it goes to."""

    revision: int
    owner_id: str
    media_id: str
    # The status name without its prefix: PENDING, PROCESSING, COMPLETED, FAILED, ...
    status: str
    # When the change happened (seconds since the epoch).
    event_time: float
    data: bytes


@dataclass(frozen=True, slots=True)
class Position:
    """A bookmark: every matching change up to ``revision`` has been passed on."""

    revision: int


class WatchSource(Protocol):
    """The analysis service's ``WatchStatus``, seen from the gateway.

    Both methods raise :class:`~web_gateway.errors.Refusal` for what the service answered
    (``transient`` tells the refusals worth retrying).
    """

    def open(self, watch_filter: WatchFilter, after: int) -> AsyncIterator[Change | Position]:
        """Every matching change with a revision above ``after``, then live ones."""
        ...

    async def current_revision(self) -> int:
        """The revision of the last change committed."""
        ...
