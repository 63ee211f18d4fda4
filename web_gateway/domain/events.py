"""Status events as the gateway passes them on, and the upstream they come from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from google.rpc import code_pb2

from web_gateway.errors import Refusal

# Upstream refusals after which a watch starts again from where it was: the service was
# restarting, draining, overloaded, or cut this watch off as too slow.
_TRANSIENT_CODES = frozenset(
    {
        code_pb2.UNAVAILABLE,
        code_pb2.RESOURCE_EXHAUSTED,
        code_pb2.DEADLINE_EXCEEDED,
        code_pb2.CANCELLED,
        code_pb2.ABORTED,
        code_pb2.INTERNAL,
        code_pb2.UNKNOWN,
    }
)
# A revision the event log no longer holds, or one from a replaced log: the client's state
# is lost; it reloads and watches from now.
RESYNC_REASONS = frozenset({"REVISION_COMPACTED", "REVISION_AHEAD"})


def is_transient(refusal: Refusal) -> bool:
    return refusal.code in _TRANSIENT_CODES


def is_resync(refusal: Refusal) -> bool:
    return refusal.code == code_pb2.OUT_OF_RANGE and refusal.reason in RESYNC_REASONS


@dataclass(frozen=True)
class WatchFilter:
    """What one shared upstream watch selects, as ``WatchStatus`` does: an owner, media ids
    (empty: every owner, every item)."""

    owner_id: str = ""
    media_ids: frozenset[str] = frozenset()


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

    Both methods raise :class:`Refusal` for what the service answered (``is_transient`` tells
    the refusals worth retrying).
    """

    def open(self, watch_filter: WatchFilter, after: int) -> AsyncIterator[Change | Position]:
        """Every matching change with a revision above ``after``, then live ones."""
        ...

    async def current_revision(self) -> int:
        """The revision of the last change committed."""
        ...
