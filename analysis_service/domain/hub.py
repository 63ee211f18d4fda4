"""Fan-out of committed status events to watchers, each with a bounded buffer."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from analysis_service.domain.models import StatusEvent
from analysis_service.domain.pacing import DeliveryPacer
from analysis_service.errors import (
    ShuttingDown,
    TooManyWatchers,
    WatcherTooSlow,
    WatchInterrupted,
)
from mediatag_common.caller_slots import CallerSlots, SlotsFull
from mediatag_common.callers import ANONYMOUS, Caller

logger = logging.getLogger(__name__)

# A watcher holding more untaken events than this is not waited for by ``paced``: it
# is not reading (and will be cut off), or too far behind for a pause to help it.
PACED_BACKLOG = 8
# The share of watchers ``paced`` does not wait for, so a few stragglers cannot pace
# the workers.
PACING_STRAGGLERS = 0.01


@dataclass(frozen=True)
class WatchFilter:
    """Which events a watcher sees: listed media ids (empty = all), one owner (empty = all),
    and the owners its token may see (None = all)."""

    media_ids: frozenset[str] = frozenset()
    owner_id: str = ""
    allowed_owners: frozenset[str] | None = None

    def matches(self, event: StatusEvent) -> bool:
        # Runs per event per watcher: a set lookup each, nothing more.
        if self.media_ids and event.media_id not in self.media_ids:
            return False
        if self.owner_id and event.owner_id != self.owner_id:
            return False
        return self.allowed_owners is None or event.owner_id in self.allowed_owners

    def select(self, events: Sequence[StatusEvent]) -> Sequence[StatusEvent]:
        """The events this filter lets through, in order (``events`` itself when it lets
        every event through)."""
        if not self.media_ids and not self.owner_id and self.allowed_owners is None:
            return events
        return [event for event in events if self.matches(event)]


class Subscription:
    """One watcher's live feed. A watcher still holding ``buffer_size`` unsent events when
    the next commit comes is cut off rather than slowing the workers or holding unbounded
    memory."""

    def __init__(self, hub: StatusHub, watch_filter: WatchFilter, buffer_size: int) -> None:
        self._hub = hub
        self.filter = watch_filter
        self._buffer_size = buffer_size
        self._events: collections.deque[StatusEvent] = collections.deque()
        self._ended: Exception | None = None
        # The watcher's pending ``next()``, and the one timer that ends it when the watcher
        # has been idle too long (see ``next``).
        self._waiter: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._max_wait = 0.0
        self._idle_since = asyncio.get_running_loop().time()
        # Counts of events ever taken and ever handed on, and ``_taken`` at the end of the
        # last burst (below).
        self._taken = 0
        self._handed_on = 0
        self._burst_end = 0
        # Whether the hub counts this watcher as still taking a delivery (see ``paced``).
        self._delivering = False

    def offer(self, matching: Sequence[StatusEvent]) -> None:
        """Take the events of one commit that match the filter.

        Slow means ``buffer_size`` events behind when the next commit comes. A burst is
        forgiven once until it has been read: a commit that takes a watcher that was keeping
        up (at most half its buffer behind) beyond its buffer (a retry of many jobs) is taken
        whole, and the count starts again at its end, so the watcher is not cut off by the
        commits right after it. A watcher that falls behind commit by commit is not keeping
        up, and its last small commit is no burst. Memory stays bounded by about one and a
        half buffers plus one commit.
        """
        if self._ended is not None or not matching:
            return
        if self._taken - max(self._handed_on, self._burst_end) >= self._buffer_size:
            self.end(
                WatcherTooSlow(
                    f"watcher fell {self._buffer_size} events behind; resume from its last revision"
                )
            )
            return
        was_keeping_up = len(self._events) <= self._buffer_size // 2
        self._events.extend(matching)
        self._taken += len(matching)
        if (
            len(self._events) > self._buffer_size
            and was_keeping_up
            and self._handed_on >= self._burst_end
        ):
            self._burst_end = self._taken
        self._track_delivery()
        self._wake()

    def end(self, reason: Exception) -> None:
        """End the feed; the watcher's next read raises ``reason``.

        It leaves the hub at once: a watcher cut off while its client is not reading stays
        blocked in a send until the client reads or goes, and must not hold a watcher slot
        (or be offered events) meanwhile.
        """
        if self._ended is None:
            self._ended = reason
            self._leave_hub()
            self._wake()

    def raise_if_ended(self) -> None:
        """Raise what ended the feed, if it has ended: a watcher still sending its initial
        state stops there instead of reading and sending the rest for nothing."""
        if self._ended is not None:
            raise self._ended

    async def next(self, max_wait: float) -> StatusEvent | None:
        """The next event, or None when the watcher has had nothing for ``max_wait`` seconds
        (counted from the previous ``next()``, or from the subscription).

        No timer per call: this runs per event per watcher, and arming and cancelling a
        timeout for each cost 16 µs against 4 µs for the wake-up alone (1,000 waiting
        subscriptions, a micro-benchmark). One timer per subscription fires at most once per
        ``max_wait`` and re-arms itself while events flow.
        """
        loop = asyncio.get_running_loop()
        if not self._events and self._ended is None:
            self._max_wait = max_wait
            if self._idle_timer is None:
                self._idle_timer = loop.call_at(self._idle_since + max_wait, self._on_idle_timer)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._idle_since = loop.time()
        if self._ended is not None:
            raise self._ended
        if not self._events:
            return None
        self._handed_on += 1
        event = self._events.popleft()
        self._track_delivery()
        return event

    def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._leave_hub()

    def _leave_hub(self) -> None:
        """Drop what is held and leave: no slot, no events offered, not waited for by pacing."""
        self._events.clear()
        self._track_delivery()
        self._hub.unsubscribe(self)

    def _track_delivery(self) -> None:
        delivering = 0 < len(self._events) <= PACED_BACKLOG
        if delivering != self._delivering:
            self._delivering = delivering
            self._hub.delivery_changed(delivering)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        if self._waiter is None or self._waiter.done():
            # Busy sending: the next wait arms the timer again.
            return
        due = self._idle_since + self._max_wait
        loop = asyncio.get_running_loop()
        if loop.time() >= due:
            self._waiter.set_result(None)
        else:
            # Events came since the timer was armed: wait out the rest of the idle time.
            self._idle_timer = loop.call_at(due, self._on_idle_timer)


class StatusHub:
    """Publishes committed events, in commit order, to every matching subscription.

    It also paces the workers' commits to the fan-out (``paced``).
    """

    def __init__(
        self,
        *,
        buffer_size: int,
        max_watchers: int,
        max_watchers_per_caller: int | None = None,
        max_service_watchers: int = 100,
        current_revision: int = 0,
    ) -> None:
        self._buffer_size = buffer_size
        self._slots = CallerSlots(
            clients=max_watchers,
            per_caller=max_watchers_per_caller,
            per_service=max_service_watchers,
        )
        self._subscriptions: dict[Subscription, Caller] = {}
        self._closed = False
        self.current_revision = current_revision
        self.events_published = 0
        # Watchers holding 1 to PACED_BACKLOG untaken events.
        self._delivering = 0
        self._pacer = DeliveryPacer(self._is_delivered)

    @property
    def watcher_count(self) -> int:
        return len(self._subscriptions)

    def publish(self, events: Sequence[StatusEvent], *, follows_gap: bool = False) -> None:
        """Called after the commit of ``events`` (under the write lock, so in order).

        ``follows_gap``: events before them will never be published (a replica's tailer
        found the log compacted past what it had read). Every subscription is ended first,
        as by a shutdown: a watcher is never handed a gap, it resumes from its last revision
        and the log tells it whether that revision is still kept. Those who subscribe
        afterwards start from the log too, and so see no gap.
        """
        if follows_gap:
            self._end_all(
                lambda: WatchInterrupted(
                    "this replica's feed of changes was interrupted (the event log was "
                    "compacted past it); resume from your last revision"
                )
            )
        if not events:
            return
        self.current_revision = max(self.current_revision, events[-1].revision)
        self.events_published += len(events)
        # Watchers without a list of ids share one selection per distinct filter (most watch
        # everything, or one owner): a pass over the commit per filter, not per watcher. A
        # list of ids is the watcher's own (comparing two equal lists would cost as much).
        selections: dict[WatchFilter, Sequence[StatusEvent]] = {}
        for subscription in list(self._subscriptions):
            watch_filter = subscription.filter
            if watch_filter.media_ids:
                subscription.offer(watch_filter.select(events))
                continue
            selected = selections.get(watch_filter)
            if selected is None:
                selected = selections[watch_filter] = watch_filter.select(events)
            subscription.offer(selected)

    def paced(self, max_wait: float) -> contextlib.AbstractAsyncContextManager[None]:
        """A block for a commit that publishes, run in turn with the fan-out (see
        :mod:`analysis_service.domain.pacing`): once the watchers have taken the changes
        published before, and no other paced commit is running; after ``max_wait`` seconds
        of waiting, out of turn. With no watchers, or ``max_wait`` 0, at once.

        Not waited for: watchers holding more than ``PACED_BACKLOG`` untaken events (one
        that stopped reading must not slow the workers), and ``PACING_STRAGGLERS`` of all.
        """
        if max_wait <= 0 or not self._subscriptions:
            return contextlib.nullcontext()
        return self._pacer.turn(max_wait)

    def delivery_changed(self, delivering: bool) -> None:
        """A subscription started or finished taking a delivery."""
        self._delivering += 1 if delivering else -1
        if not delivering:
            self._pacer.pass_turn()

    def _is_delivered(self) -> bool:
        return self._delivering <= int(len(self._subscriptions) * PACING_STRAGGLERS)

    def subscribe(self, watch_filter: WatchFilter, holder: Caller = ANONYMOUS) -> Subscription:
        """A subscription of ``holder``, refused beyond its slots: a service has its own, apart
        from the clients'; a client is refused when every client slot is taken, or its share
        of them (so that one client cannot take them all)."""
        if self._closed:
            raise ShuttingDown("the analysis service is shutting down")
        full = self._slots.take(holder)
        if full is not None:
            raise _too_many_watchers(full, self._slots.limit(full))
        subscription = Subscription(self, watch_filter, self._buffer_size)
        self._subscriptions[subscription] = holder
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        holder = self._subscriptions.pop(subscription, None)
        if holder is not None:
            self._slots.give_back(holder)
        self._pacer.pass_turn()

    def close(self) -> None:
        """End every stream with UNAVAILABLE; watchers resume from their last revision."""
        self._closed = True
        self._end_all(lambda: ShuttingDown("the analysis service is shutting down"))

    def _end_all(self, reason: Callable[[], Exception]) -> None:
        # One exception each: every watcher raises its own, and a raise extends the
        # traceback of the object raised. A copy of the set: each leaves it as it ends.
        for subscription in list(self._subscriptions):
            subscription.end(reason())


def _too_many_watchers(full: SlotsFull, limit: int) -> TooManyWatchers:
    if full is SlotsFull.CALLER:
        return TooManyWatchers(
            f"at most {limit} watchers of one caller; close one first",
            reason="TOO_MANY_WATCHERS_FOR_CALLER",
            metadata={"maxWatchersPerCaller": str(limit)},
        )
    if full is SlotsFull.SERVICE:
        return TooManyWatchers(
            f"at most {limit} watchers of a service", metadata={"maxServiceWatchers": str(limit)}
        )
    return TooManyWatchers(
        f"at most {limit} watchers; retry with backoff", metadata={"maxWatchers": str(limit)}
    )
