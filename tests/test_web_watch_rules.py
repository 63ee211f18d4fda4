"""The gateway's shared watches on a fake clock, fed by an in-memory source (no servers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.rpc import code_pb2, error_details_pb2

from mediatag_common.callers import ANONYMOUS, Caller
from web_gateway.config import EventsConfig
from web_gateway.domain.events import Change, Position, WatchFilter
from web_gateway.domain.watches import SharedWatches, Subscription
from web_gateway.errors import Refusal

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


class Streams:
    """The subscriptions a test opens on ``watches``, of an owner's filter (every owner's by
    default), each closed at the end."""

    def __init__(self, watches: SharedWatches) -> None:
        self.watches = watches
        self.held: list[Subscription] = []

    async def open(self, holder: Caller, owner: str = "") -> Subscription:
        subscription = await self.watches.subscribe(
            WatchFilter(owner_id=owner), after=None, visible=None, holder=holder
        )
        self.held.append(subscription)
        return subscription

    async def refused(self, holder: Caller, owner: str = "") -> tuple[int, str, dict[str, str]]:
        """The code, reason and metadata the subscription is refused with; a refused one
        holds nothing."""
        streams = self.watches.streams
        with pytest.raises(Refusal) as caught:
            await self.open(holder, owner)
        assert self.watches.streams == streams
        (detail,) = caught.value.status.details
        info = error_details_pb2.ErrorInfo()
        detail.Unpack(info)
        return caught.value.status.code, info.reason, dict(info.metadata)

    async def close(self) -> None:
        for subscription in self.held:
            await subscription.close()
        await self.watches.close()


def change(revision: int) -> Change:
    return Change(revision, "owner", f"media-{revision}", "PENDING", 0.0, b"{}")


async def test_a_change_queued_as_the_idle_time_runs_out_is_sent_not_skipped() -> None:
    source = QueuedSource()
    watches = SharedWatches(source, EventsConfig())
    subscription = await watches.subscribe(WatchFilter(), after=0, visible=None, holder=ANONYMOUS)
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


async def test_one_caller_holds_at_most_its_share_of_the_event_streams() -> None:
    watches = SharedWatches(QueuedSource(), EventsConfig(max_streams=4))  # shares of 2
    streams = Streams(watches)
    alice, bob, carol = Caller("alice"), Caller("bob"), Caller("carol")
    service = Caller("ingest", service=True)
    try:
        first = await streams.open(alice)
        await streams.open(alice)
        assert await streams.refused(alice) == (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_EVENT_STREAMS_FOR_CALLER",
            {"maxStreamsPerCaller": "2"},
        )
        # Others still get theirs, up to the bound of all; a service has places of its own.
        await streams.open(bob)
        await streams.open(bob)
        assert await streams.refused(carol) == (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_EVENT_STREAMS",
            {"maxStreams": "4"},
        )
        await streams.open(service)
        assert watches.streams == 5
        # A closed stream gives its caller's place back.
        await first.close()
        await streams.open(alice)
        assert watches.streams == 5
    finally:
        await streams.close()
    assert watches.streams == 0


async def test_one_caller_watches_at_most_its_share_of_the_filters() -> None:
    config = EventsConfig(max_filters=4, linger=5.0)  # shares of 2
    watches = SharedWatches(QueuedSource(), config)
    streams = Streams(watches)
    alice, bob, carol = Caller("alice"), Caller("bob"), Caller("carol")

    def own_share(limit: int) -> tuple[int, str, dict[str, str]]:
        return (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_FILTERS_FOR_CALLER",
            {"maxFiltersPerCaller": str(limit)},
        )

    try:
        on_a = await streams.open(alice, "a")
        await streams.open(alice, "b")
        assert await streams.refused(alice, "c") == own_share(2)
        # More streams on the filters it has are not more filters.
        await streams.open(alice, "a")
        # Others have the rest; a filter someone else started counts for each caller on it.
        await streams.open(bob, "c")
        assert await streams.refused(alice, "c") == own_share(2)
        await streams.open(bob, "a")
        await streams.open(carol, "d")
        assert watches.upstream_watches == 4
        assert await streams.refused(carol, "e") == (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_FILTERS",
            {"maxFilters": "4"},
        )
        # Its last stream on a filter closed, a caller has room in its share for another,
        # once there is room in all: a filter's watch stops when nobody has watched it for
        # the linger time.
        await on_a.close()
        await streams.held[2].close()
        assert await streams.refused(alice, "e") == (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_FILTERS",
            {"maxFilters": "4"},
        )
        await streams.held[4].close()
        await asyncio.sleep(config.linger + 1)
        assert watches.upstream_watches == 3
        await streams.open(alice, "e")
        # A service is held to the bound of all alone.
        service = Caller("ingest", service=True)
        for owner in "bcd":
            await streams.open(service, owner)
    finally:
        await streams.close()
    assert watches.streams == 0
