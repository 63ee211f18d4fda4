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
        (detail,) = caught.value.status.details
        info = error_details_pb2.ErrorInfo()
        detail.Unpack(info)
        return caught.value.status.code, info.reason, dict(info.metadata)

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
