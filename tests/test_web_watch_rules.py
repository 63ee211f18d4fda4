"""The gateway's shared watches on a fake clock, fed by an in-memory source (no servers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from web_gateway.config import EventsConfig
from web_gateway.domain.events import Change, Position, WatchFilter
from web_gateway.domain.watches import SharedWatches

pytestmark = pytest.mark.looptime

IDLE = 0.2


class QueuedSource:
    """``WatchStatus`` as the analysis service answers it: what the test puts, in order."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[Change | Position] = asyncio.Queue()

    async def open(self, watch_filter: WatchFilter, after: int) -> AsyncIterator[Change | Position]:
        while True:
            yield await self.items.get()

    async def current_revision(self) -> int:
        return 0


def change(revision: int) -> Change:
    return Change(revision, "owner", f"media-{revision}", "PENDING", 0.0, b"{}")


async def test_a_change_queued_as_the_idle_time_runs_out_is_sent_not_skipped() -> None:
    source = QueuedSource()
    watches = SharedWatches(source, EventsConfig())
    subscription = await watches.subscribe(WatchFilter(), after=0, visible=None)
    try:
        source.items.put_nowait(change(1))
        assert await subscription.next(IDLE) == change(1)

        # The client waits; its idle time runs out in the very turn of the loop in which the
        # shared watch receives change 2 (a loaded machine makes that turn long). The change
        # is handed to the shared watch directly, due within the clock's resolution before
        # the idle time ends: the loop runs both in one turn, the change first.
        watch = watches._watches[WatchFilter()]
        loop = asyncio.get_running_loop()
        due = loop.time() + IDLE - loop._clock_resolution / 10  # type: ignore[attr-defined]
        loop.call_at(due, watch._publish, change(2))
        waiting = asyncio.create_task(subscription.next(IDLE))
        first = await waiting
        second = await subscription.next(IDLE)

        # Change 2 comes, before or after a position; a position never passes it unsent.
        sent = [first, second]
        assert change(2) in sent, sent
        positions = [item.revision for item in sent if isinstance(item, Position)]
        assert all(revision < 2 for revision in positions[: sent.index(change(2))]), sent
    finally:
        await subscription.close()
        await watches.close()
