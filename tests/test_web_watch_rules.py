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


def refusal_of(caught: pytest.ExceptionInfo[Refusal]) -> tuple[int, str, dict[str, str]]:
    """The code, reason and metadata of a refusal."""
    (detail,) = caught.value.status.details
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    return caught.value.status.code, info.reason, dict(info.metadata)


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
    alice, bob, carol = Caller("alice"), Caller("bob"), Caller("carol")
    service = Caller("ingest", service=True)
    held: list[Subscription] = []

    async def subscribe(holder: Caller) -> Subscription:
        subscription = await watches.subscribe(
            WatchFilter(), after=None, visible=None, holder=holder
        )
        held.append(subscription)
        return subscription

    async def refusal(holder: Caller) -> tuple[int, str, dict[str, str]]:
        """The code, reason and metadata ``holder``'s subscription is refused with."""
        with pytest.raises(Refusal) as caught:
            await subscribe(holder)
        return refusal_of(caught)

    try:
        first = await subscribe(alice)
        await subscribe(alice)
        assert await refusal(alice) == (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_EVENT_STREAMS_FOR_CALLER",
            {"maxStreamsPerCaller": "2"},
        )
        # Others still get theirs, up to the bound of all; a service has places of its own.
        await subscribe(bob)
        await subscribe(bob)
        assert await refusal(carol) == (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_EVENT_STREAMS",
            {"maxStreams": "4"},
        )
        await subscribe(service)
        assert watches.streams == 5
        # A closed stream gives its caller's place back.
        await first.close()
        await subscribe(alice)
        assert watches.streams == 5
    finally:
        for subscription in held:
            await subscription.close()
        await watches.close()
    assert watches.streams == 0


async def test_one_caller_watches_at_most_its_share_of_the_filters() -> None:
    config = EventsConfig(max_filters=4, linger=5.0)  # shares of 2
    watches = SharedWatches(QueuedSource(), config)
    alice, bob, carol = Caller("alice"), Caller("bob"), Caller("carol")
    held: list[Subscription] = []

    async def subscribe(holder: Caller, owner: str) -> Subscription:
        subscription = await watches.subscribe(
            WatchFilter(owner_id=owner), after=None, visible=None, holder=holder
        )
        held.append(subscription)
        return subscription

    async def refusal(holder: Caller, owner: str) -> tuple[int, str, dict[str, str]]:
        streams = watches.streams
        with pytest.raises(Refusal) as caught:
            await subscribe(holder, owner)
        # A refused stream holds nothing.
        assert watches.streams == streams
        return refusal_of(caught)

    def own_share(limit: int) -> tuple[int, str, dict[str, str]]:
        return (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_FILTERS_FOR_CALLER",
            {"maxFiltersPerCaller": str(limit)},
        )

    try:
        on_a = await subscribe(alice, "a")
        await subscribe(alice, "b")
        assert await refusal(alice, "c") == own_share(2)
        # More streams on the filters it has are not more filters.
        await subscribe(alice, "a")
        # Others have the rest; a filter someone else started counts for each caller on it.
        await subscribe(bob, "c")
        assert await refusal(alice, "c") == own_share(2)
        await subscribe(bob, "a")
        await subscribe(carol, "d")
        assert watches.upstream_watches == 4
        assert await refusal(carol, "e") == (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_FILTERS",
            {"maxFilters": "4"},
        )
        # Its last stream on a filter closed, a caller has room in its share for another,
        # once there is room in all: a filter's watch stops when nobody has watched it for
        # the linger time.
        await on_a.close()
        await held[2].close()
        assert await refusal(alice, "e") == (
            code_pb2.RESOURCE_EXHAUSTED,
            "TOO_MANY_FILTERS",
            {"maxFilters": "4"},
        )
        await held[4].close()
        await asyncio.sleep(config.linger + 1)
        assert watches.upstream_watches == 3
        await subscribe(alice, "e")
        # A service is held to the bound of all alone.
        service = Caller("ingest", service=True)
        for owner in "bcd":
            await subscribe(service, owner)
    finally:
        for subscription in held:
            await subscription.close()
        await watches.close()
    assert watches.streams == 0
