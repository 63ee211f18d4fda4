"""The gateway's shared watches on a fake clock, fed by an in-memory source (no servers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.rpc import code_pb2, error_details_pb2

from mediatag_common.callers import ANONYMOUS, Caller
from web_gateway.config import EventsConfig
from web_gateway.domain.events import Change, Position, WatchFilter
from web_gateway.domain.watches import SharedWatches, Subscription, Visibility
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

    async def open(
        self, holder: Caller, owner: str = "", visible: Visibility = None
    ) -> Subscription:
        subscription = await self.watches.subscribe(
            WatchFilter(owner_id=owner), after=None, visible=visible, holder=holder
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


def out_of_range(reason: str, message: str) -> Refusal:
    return Refusal.of(code_pb2.OUT_OF_RANGE, reason, message)


class LogSource:
    """``WatchStatus`` as the analysis service answers it, from an event log in memory: a
    watch replays the log after its revision (refused when that is compacted, or past the
    current revision) and ends the replay with a bookmark, then the live changes; a stream
    that sent nothing for ``bookmark_interval`` gets a bookmark. Every watch opened is
    recorded in ``opens``."""

    def __init__(self, bookmark_interval: float = 30.0) -> None:
        self.bookmark_interval = bookmark_interval
        self.log: list[Change] = []
        self.compacted_through = 0
        self.opens: list[tuple[WatchFilter, int]] = []
        self._live: list[asyncio.Queue[Change]] = []
        self._registered = asyncio.Event()

    @property
    def current(self) -> int:
        return self.log[-1].revision if self.log else 0

    def commit(self, owner: str, count: int = 1) -> list[Change]:
        """``count`` changes of ``owner``'s items, each to every watch open."""
        made = []
        for _ in range(count):
            revision = self.current + 1
            made.append(Change(revision, owner, f"media-{revision}", "PENDING", 0.0, b"{}"))
            self.log.append(made[-1])
            for live in self._live:
                live.put_nowait(made[-1])
        return made

    async def open(self, watch_filter: WatchFilter, after: int) -> AsyncIterator[Change | Position]:
        self.opens.append((watch_filter, after))
        if after < self.compacted_through:
            raise out_of_range("REVISION_COMPACTED", f"revision {after} is compacted")
        if after > self.current:
            raise out_of_range("REVISION_AHEAD", f"revision {after} is ahead")
        # Registered before the log is read, as the hub does: nothing falls in between.
        live: asyncio.Queue[Change] = asyncio.Queue()
        self._live.append(live)
        self._registered.set()
        try:
            snapshot = self.current
            # 0: from now.
            for logged in self.log[after or snapshot : snapshot]:
                if _matches(watch_filter, logged):
                    yield logged
            if after:
                # The end of the replay.
                yield Position(snapshot)
            last = snapshot
            while True:
                try:
                    async with asyncio.timeout(self.bookmark_interval):
                        item = await live.get()
                except TimeoutError:
                    yield Position(self.current)
                    continue
                if item.revision > last and _matches(watch_filter, item):
                    last = item.revision
                    yield item
        finally:
            self._live.remove(live)

    async def current_revision(self) -> int:
        return self.current

    async def watching(self, count: int) -> None:
        """Wait until ``count`` watches are open (each receives every commit from then)."""
        while len(self._live) < count:
            self._registered.clear()
            await self._registered.wait()


def _matches(watch_filter: WatchFilter, item: Change) -> bool:
    return not watch_filter.owner_id or item.owner_id == watch_filter.owner_id


async def changes_until_idle(subscription: Subscription) -> tuple[list[int], int]:
    """The revisions of the changes ``subscription`` sends, and the position it reports
    once it has nothing more."""
    found: list[int] = []
    while True:
        item = await subscription.next(IDLE)
        if isinstance(item, Position):
            return found, item.revision
        found.append(item.revision)


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


def filters_share(limit: int) -> tuple[int, str, dict[str, str]]:
    return (
        code_pb2.RESOURCE_EXHAUSTED,
        "TOO_MANY_FILTERS_FOR_CALLER",
        {"maxFiltersPerCaller": str(limit)},
    )


async def refusal_ending(subscription: Subscription) -> Refusal:
    """What ``subscription`` is ended with, once its changes are read."""
    try:
        while True:
            await subscription.next(IDLE)
    except Refusal as refusal:
        return refusal


async def test_a_stream_that_ended_is_counted_off_its_caller_once() -> None:
    # A stream cut off as too slow (or refused while catching up) leaves its shared watch
    # then, and is closed by its client's handler later.
    source = LogSource()
    source.commit("other")
    config = EventsConfig(stream_buffer=2, max_filters=8, max_filters_per_caller=2)
    watches = SharedWatches(source, config)
    streams = Streams(watches)
    alice, bob = Caller("alice"), Caller("bob")
    try:
        # Alice keeps one stream on "a" (seeing none of its changes, it never falls behind).
        await streams.open(alice, "a", visible=lambda owner: False)
        slow = await streams.open(alice, "a")
        lone = await streams.open(bob, "a")
        await source.watching(1)
        source.commit("a", config.stream_buffer + 1)
        for cut in (slow, lone):
            assert (await refusal_ending(cut)).reason == "EVENT_STREAM_TOO_SLOW"
            await cut.close()

        # Alice still has "a": one more filter is her share.
        await streams.open(alice, "b")
        assert await streams.refused(alice, "c") == filters_share(2)
        # Bob has nothing left on "a": his whole share is free.
        await streams.open(bob, "b")
        await streams.open(bob, "c")
        assert await streams.refused(bob, "d") == filters_share(2)
    finally:
        await streams.close()
    assert watches.streams == 0


async def test_a_shared_watch_starts_at_the_current_revision_whoever_opens_it() -> None:
    source = LogSource()
    source.commit("o", 15)
    watches = SharedWatches(source, EventsConfig())
    on_o = WatchFilter(owner_id="o")
    # The first client resumes from revision 2 and so starts the shared watch; another
    # opens from now a moment later.
    resuming = await watches.subscribe(on_o, after=2, visible=None, holder=Caller("a"))
    from_now = await watches.subscribe(on_o, after=None, visible=None, holder=Caller("b"))
    try:
        # The shared watch from the current revision; the resuming client's own catch-up
        # watch from its revision.
        assert await changes_until_idle(from_now) == ([], 15)
        assert source.opens == [(on_o, 15), (on_o, 2)]
        assert await changes_until_idle(resuming) == (list(range(3, 16)), 15)
        (new,) = source.commit("o")
        for subscription in (resuming, from_now):
            assert await subscription.next(IDLE) == new
    finally:
        for subscription in (resuming, from_now):
            await subscription.close()
        await watches.close()


async def test_a_revision_compacted_or_ahead_resets_only_the_client_that_asked_for_it() -> None:
    source = LogSource()
    source.commit("o", 15)
    source.compacted_through = 10
    watches = SharedWatches(source, EventsConfig())
    on_o = WatchFilter(owner_id="o")
    # Compacted, by the client that starts the shared watch; past the log, by one that
    # joins it.
    compacted = await watches.subscribe(on_o, after=2, visible=None, holder=Caller("a"))
    from_now = await watches.subscribe(on_o, after=None, visible=None, holder=Caller("b"))
    ahead = await watches.subscribe(on_o, after=99, visible=None, holder=Caller("c"))
    try:
        for subscription, reason in ((compacted, "REVISION_COMPACTED"), (ahead, "REVISION_AHEAD")):
            with pytest.raises(Refusal) as ended:
                await subscription.next(IDLE)
            assert ended.value.resync
            assert ended.value.reason == reason
        assert await from_now.next(IDLE) == Position(15)
        (new,) = source.commit("o")
        assert await from_now.next(IDLE) == new
        assert watches.upstream_watches == 1
    finally:
        for subscription in (compacted, from_now, ahead):
            await subscription.close()
        await watches.close()


async def test_a_client_ahead_of_the_shared_watch_does_not_catch_up() -> None:
    # A quiet filter's shared watch receives nothing but the analysis service's idle
    # bookmarks, so its revision lags the log's; a client resuming with a later id (from
    # another gateway, or this one's before a restart) has nothing to catch up.
    source = LogSource(bookmark_interval=30.0)
    watches = SharedWatches(source, EventsConfig(max_catch_ups=1))
    on_a, on_b = WatchFilter(owner_id="qa"), WatchFilter(owner_id="qb")
    source.commit("busy", 5)
    watching_b = await watches.subscribe(on_b, after=None, visible=None, holder=Caller("x"))
    quiet_a = await watches.subscribe(on_a, after=None, visible=None, holder=Caller("x"))
    resumed: list[Subscription] = []
    try:
        await source.watching(2)
        source.commit("busy", 15)
        # The other gateway's clients also had change 21.
        (elsewhere,) = source.commit("qb")
        for watch_filter in (on_a, on_b):
            resumed.append(
                await watches.subscribe(
                    watch_filter, after=elsewhere.revision, visible=None, holder=Caller("y")
                )
            )
        resumed_a, resumed_b = resumed
        loop = asyncio.get_running_loop()
        began = loop.time()
        (new,) = source.commit("qb")
        # The change comes at once, not after a catch-up of the quiet filter "qa" in the one
        # catch-up slot; change 21 is not sent again.
        assert await resumed_b.next(IDLE) == new
        assert loop.time() - began < IDLE
        assert await watching_b.next(IDLE) == elsewhere
        assert await watching_b.next(IDLE) == new
        # No catch-up watch was opened; positions never go back before the client's id.
        assert source.opens == [(on_b, 5), (on_a, 5)]
        assert await resumed_a.next(IDLE) == Position(elsewhere.revision)
        assert await quiet_a.next(IDLE) == Position(5)
    finally:
        for subscription in (watching_b, quiet_a, *resumed):
            await subscription.close()
        await watches.close()


class CountingSource(LogSource):
    """A log whose current revision takes a moment to read, and counts the readings."""

    asked = 0

    async def current_revision(self) -> int:
        self.asked += 1
        await asyncio.sleep(0.01)
        return self.current


async def test_clients_resuming_at_once_ask_the_log_for_its_revision_once() -> None:
    # A crowd reconnecting together (a load balancer switching gateways): one watch opened
    # upstream each, just to read the revision, would take the gateway token's share of the
    # analysis service's watchers.
    source = CountingSource()
    source.commit("busy", 5)
    watches = SharedWatches(source, EventsConfig())
    on_o = WatchFilter(owner_id="o")
    first = await watches.subscribe(on_o, after=None, visible=None, holder=Caller("x"))
    # Changes the quiet filter's watch does not see: the crowd's id is ahead of it.
    await source.watching(1)
    source.commit("busy", 5)
    asked = source.asked
    crowd = await asyncio.gather(
        *(
            watches.subscribe(on_o, after=10, visible=None, holder=Caller(f"c{n}"))
            for n in range(20)
        )
    )
    try:
        assert source.asked == asked + 1
        (new,) = source.commit("o")
        for subscription in crowd:
            assert await subscription.next(IDLE) == new
    finally:
        for subscription in (first, *crowd):
            await subscription.close()
        await watches.close()
