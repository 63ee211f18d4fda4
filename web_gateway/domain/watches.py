"""Upstream ``WatchStatus`` streams shared by many clients: one per filter.

A :class:`SharedWatch` reads one upstream stream for its filter and offers each change to
every :class:`Subscription` on it, each with its own bounded queue and its own visibility
(an owner-restricted client sees only its owners' changes). The gateway watches with its own
credential, so sharing does not depend on who asks; what a client may see is applied here,
per subscription.

Clients resume by revision. A shared watch starts at the log's current revision, whoever
opens it: what one client asks for never decides what the others get (history they did not
ask for, or a ``reset`` for a revision that only it held). It remembers its last
``replay_events`` changes: a client resuming from within them gets them from memory and then
the live changes. One resuming from further back reads the event log through a catch-up
watch of its own until that reaches the point where it joined the shared watch, and then goes
on with the live changes it was offered meanwhile; revisions decide what was already sent, so
nothing is missed or sent twice. One resuming from past the shared watch's revision (an id
from another gateway, or a quiet filter's watch behind the log) has nothing to catch up: it
waits for the changes after its revision, those up to it skipped as already sent; only a
revision past the log's current one (a log that was replaced) goes to a catch-up watch, for
the analysis service to refuse. A shared watch whose upstream stream breaks (the analysis
service restarts) resumes from its last revision while its clients stay connected.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from mediatag_common.backoff import Backoff
from mediatag_common.caller_slots import CallerSlots, SlotsFull
from mediatag_common.callers import Caller
from mediatag_common.tasks import cancel_and_wait
from web_gateway.config import EventsConfig
from web_gateway.domain.events import Change, Position, WatchFilter, WatchSource
from web_gateway.errors import Refusal, exhausted, internal, unavailable

logger = logging.getLogger(__name__)

# Who may see a change, by its owner; None: everyone.
Visibility = Callable[[str], bool] | None


def _too_slow(buffer: int) -> Refusal:
    return exhausted(
        "EVENT_STREAM_TOO_SLOW",
        f"this event stream fell {buffer} changes behind; reconnect with Last-Event-ID",
        streamBuffer=str(buffer),
    )


def _closing() -> Refusal:
    return unavailable("GATEWAY_CLOSING", "the gateway is shutting down")


class Subscription:
    """One client's view of a shared watch: ``next()`` gives its changes in revision order,
    or a :class:`Position` when nothing happened for a while (a keep-alive to resume from)."""

    def __init__(self, watch: SharedWatch, visible: Visibility, after: int, holder: Caller) -> None:
        self._watch = watch
        self._visible = visible
        self._holder = holder
        self._buffer = watch.config.stream_buffer
        self._live: collections.deque[Change] = collections.deque()
        self._wake = asyncio.Event()
        # The last revision handed to the client, and the last the shared watch offered
        # (shown to this client or not).
        self.sent = after
        self._offered = after
        self._failure: Refusal | None = None
        self._closed = False
        # While catching up: what the catch-up watch read, and how far it has read.
        self._caught: collections.deque[Change] = collections.deque()
        self._caught_through = after
        self._drained = asyncio.Event()
        self._catch_up: asyncio.Task[None] | None = None

    def _shows(self, change: Change) -> bool:
        return self._visible is None or self._visible(change.owner_id)

    # ---- fed by the shared watch ----

    def _offer(self, change: Change) -> None:
        self._offered = change.revision
        # A client that joined ahead of the shared watch had the changes up to its revision:
        # they would only take room in its buffer.
        if change.revision <= self.sent or not self._shows(change):
            return
        if len(self._live) >= self._buffer:
            self._end(_too_slow(self._buffer))
            return
        self._live.append(change)
        self._wake.set()

    def _advance(self, revision: int) -> None:
        self._offered = max(self._offered, revision)

    def _preload(self, changes: list[Change], position: int) -> None:
        self._live.extend(c for c in changes if self._shows(c))
        self._offered = max(self._offered, position)

    def _end(self, failure: Refusal) -> None:
        if self._failure is None:
            self._failure = failure
        self._watch.leave(self)
        self._wake.set()

    # ---- catching up from the event log ----

    def _start_catch_up(self, join: int) -> None:
        self._catch_up = asyncio.create_task(
            self._read_log(join), name=f"catch-up-{self._watch.filter}"
        )

    async def _read_log(self, join: int) -> None:
        """Read the event log from ``sent`` through ``join`` (the shared watch's revision
        when this client joined it); what comes after, the live queue holds."""
        watches = self._watch.registry
        async with watches.catch_up_slots:
            backoff = Backoff(self._watch.config.reconnect_initial_backoff, 1.0)
            while True:
                try:
                    async for item in watches.source.open(self._watch.filter, self._caught_through):
                        backoff.reset()
                        if item.revision > join:
                            return
                        if isinstance(item, Change) and self._shows(item):
                            while len(self._caught) >= self._buffer:
                                self._drained.clear()
                                await self._drained.wait()
                            self._caught.append(item)
                        self._caught_through = item.revision
                        self._wake.set()
                        if item.revision == join:
                            return
                except Refusal as refusal:
                    if not refusal.transient:
                        raise
                    await asyncio.sleep(backoff.next_delay())
                finally:
                    self._wake.set()

    def _take_caught(self) -> Change | None:
        """The next change read from the log; None when none is ready or catching up is
        over (``_catch_up`` then None)."""
        assert self._catch_up is not None
        while self._caught:
            change = self._caught.popleft()
            self._drained.set()
            if change.revision > self.sent:
                return change
        if self._catch_up.done():
            error = None if self._catch_up.cancelled() else self._catch_up.exception()
            self._catch_up = None
            if isinstance(error, Refusal):
                self._end(error)
            elif error is not None:
                logger.error("catching up failed", exc_info=error)
                self._end(internal())
        return None

    # ---- read by the client's handler ----

    def _take(self) -> Change | None:
        if self._catch_up is not None:
            change = self._take_caught()
            if change is not None or self._catch_up is not None:
                return change
        while self._live:
            change = self._live.popleft()
            if change.revision > self.sent:
                return change
        return None

    def _position(self) -> int:
        """How far the client has everything, once every queue is empty."""
        if self._catch_up is not None:
            return max(self.sent, self._caught_through)
        return max(self.sent, self._offered)

    async def next(self, idle: float) -> Change | Position:
        """The next change; a :class:`Position` after ``idle`` seconds without one.

        Raises :class:`Refusal` once the subscription has ended: cut off as too slow, its
        revision no longer (or not yet) in the event log, or the gateway closing.
        """
        timed_out = False
        while True:
            # Cleared before looking, so that nothing added after the look goes unnoticed.
            self._wake.clear()
            change = self._take()
            if change is not None:
                self.sent = change.revision
                return change
            # Looked at once more after the time ran out: it can run out in the loop's turn
            # that queues a change, and a position past a change still queued would have the
            # client skip it.
            if timed_out:
                self.sent = self._position()
                return Position(self.sent)
            if self._failure is not None:
                raise self._failure
            try:
                async with asyncio.timeout(idle):
                    await self._wake.wait()
            except TimeoutError:
                timed_out = True

    async def close(self) -> None:
        """Leave the shared watch (the client has gone)."""
        if self._closed:
            return
        self._closed = True
        self._watch.leave(self)
        self._watch.registry.stream_closed(self._holder)
        await cancel_and_wait(self._catch_up)


class SharedWatch:
    """One upstream watch of one filter and its subscriptions."""

    def __init__(self, registry: SharedWatches, watch_filter: WatchFilter, start: int) -> None:
        self.registry = registry
        self.config = registry.config
        self.filter = watch_filter
        # The last revision received from upstream (or where the watch started).
        self.position = start
        self._ring: collections.deque[Change] = collections.deque()
        # Every change after this revision (up to ``position``) is in the ring.
        self._ring_floor = start
        self._subscriptions: set[Subscription] = set()
        # The subscriptions of each caller (for its share of the filters).
        self._holders: collections.Counter[Caller] = collections.Counter()
        self._linger: asyncio.TimerHandle | None = None
        self._ended = False
        self._task = asyncio.create_task(self._run(), name=f"shared-watch-{watch_filter}")

    def join(
        self, visible: Visibility, after: int | None, holder: Caller, current: int | None = None
    ) -> Subscription:
        """A subscription of ``holder`` from ``after`` (None: from now); ``current``: the
        log's current revision, read for this client (None: not read, ``after`` was not past
        this watch's revision)."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        start = self.position if after is None else after
        subscription = Subscription(self, visible, start, holder)
        self._holders[holder] += 1
        if self._ring_floor <= start <= self.position:
            subscription._preload(self._replay_after(start), self.position)
        elif current is not None and self.position < start <= current:
            # Nothing to catch up: the changes up to ``start`` the watch has still to receive
            # are skipped as sent. A catch-up watch would have nothing to read either: a
            # stream and a slot taken for nothing.
            pass
        else:
            # From further back; or past the log's current revision, which the catch-up
            # watch is refused (REVISION_AHEAD: a reset for this client alone).
            subscription._start_catch_up(self.position)
        self._subscriptions.add(subscription)
        return subscription

    def _replay_after(self, revision: int) -> list[Change]:
        newer: list[Change] = []
        for change in reversed(self._ring):
            if change.revision <= revision:
                break
            newer.append(change)
        newer.reverse()
        return newer

    def holds(self, holder: Caller) -> bool:
        """Whether ``holder`` has a subscription here."""
        return holder in self._holders

    def leave(self, subscription: Subscription) -> None:
        # A subscription that ended (cut off as too slow, refused while catching up) leaves
        # then, and again when its client's handler closes it: counted off its holder once,
        # or a caller could take more than its share of the filters.
        if subscription not in self._subscriptions:
            return
        self._subscriptions.remove(subscription)
        self._holders[subscription._holder] -= 1
        if not self._holders[subscription._holder]:
            del self._holders[subscription._holder]
        if not self._subscriptions and self._linger is None and not self._ended:
            self._linger = asyncio.get_running_loop().call_later(
                self.config.linger, self._end_if_idle
            )

    def _end_if_idle(self) -> None:
        self._linger = None
        if not self._subscriptions:
            self.end(_closing())

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def _publish(self, item: Change | Position) -> None:
        if isinstance(item, Position):
            self.position = max(self.position, item.revision)
            for subscription in self._subscriptions:
                subscription._advance(self.position)
            return
        if item.revision <= self.position:
            return
        logger.debug(
            "watch of %s: revision %d, %s %s",
            self.filter,
            item.revision,
            item.media_id,
            item.status,
        )
        self.position = item.revision
        self._ring.append(item)
        if len(self._ring) > self.config.replay_events:
            self._ring_floor = self._ring.popleft().revision
        # A copy: a subscription cut off as too slow leaves the set.
        for subscription in list(self._subscriptions):
            subscription._offer(item)

    async def _run(self) -> None:
        backoff = Backoff(self.config.reconnect_initial_backoff, self.config.reconnect_max_backoff)
        while True:
            try:
                async for item in self.registry.source.open(self.filter, self.position):
                    backoff.reset()
                    self._publish(item)
                logger.warning("watch of %s ended by the analysis service; again", self.filter)
            except Refusal as refusal:
                if not refusal.transient:
                    logger.warning("watch of %s refused: %s", self.filter, refusal.status.message)
                    self.end(refusal)
                    return
                logger.info(
                    "watch of %s broke off (%s); resuming from revision %d",
                    self.filter,
                    refusal.status.message,
                    self.position,
                )
            await asyncio.sleep(backoff.next_delay())

    def end(self, failure: Refusal) -> None:
        """End every subscription with ``failure`` and stop watching."""
        if self._ended:
            return
        self._ended = True
        self.registry.forget(self, self._task)
        for subscription in list(self._subscriptions):
            subscription._end(failure)
        if self._linger is not None:
            self._linger.cancel()
        self._task.cancel()


class SharedWatches:
    """The shared watches by filter, and the bounds on them."""

    def __init__(self, source: WatchSource, config: EventsConfig) -> None:
        self.source = source
        self.config = config
        self.catch_up_slots = asyncio.Semaphore(config.max_catch_ups)
        self._watches: dict[WatchFilter, SharedWatch] = {}
        # Tasks of ended watches, until they have finished.
        self._stopping: set[asyncio.Task[None]] = set()
        # The reading of the log's current revision in progress, shared by every client that
        # needs it meanwhile: a crowd reconnecting at once would otherwise open a watch
        # upstream each, beyond the gateway token's share of the analysis service's.
        self._reading_current: asyncio.Task[int] | None = None
        self._slots = CallerSlots(
            clients=config.max_streams,
            per_caller=config.max_streams_per_caller,
            per_service=config.max_streams,
        )

    @property
    def upstream_watches(self) -> int:
        return len(self._watches)

    @property
    def streams(self) -> int:
        return self._slots.taken

    async def subscribe(
        self,
        watch_filter: WatchFilter,
        *,
        after: int | None,
        visible: Visibility,
        holder: Caller,
    ) -> Subscription:
        """A subscription of ``holder`` to ``watch_filter`` from ``after`` (None: from now).

        Refused (RESOURCE_EXHAUSTED) beyond ``max_streams`` subscriptions, ``holder``'s share
        of them, ``max_filters`` shared watches, or ``holder``'s share of those.
        """
        full = self._slots.take(holder)
        if full is not None:
            raise _too_many_streams(full, self._slots.limit(full))
        try:
            watch = self._watches.get(watch_filter)
            if watch is None:
                # Refused before asking upstream anything.
                self._check_filters(holder, None)
            current: int | None = None
            if watch is None or (after is not None and after > watch.position):
                # A new watch starts at the current revision, never at this client's: one
                # resuming from further back catches up alone. A client ahead of the watch
                # skips catching up if the log has its revision.
                current = await self._current_revision()
                # Another client may have started the same watch meanwhile, or this caller
                # others, or the watch may have ended.
                watch = self._watches.get(watch_filter)
                if watch is None:
                    self._check_filters(holder, None)
                    watch = SharedWatch(self, watch_filter, current)
                    self._watches[watch_filter] = watch
            self._check_filters(holder, watch)
            return watch.join(visible, after, holder, current)
        except BaseException:
            self.stream_closed(holder)
            raise

    async def _current_revision(self) -> int:
        """The log's current revision, one call for the clients asking at once. A client may
        get a reading started a moment before it asked: a new watch then starts that moment
        earlier, and a client past the reading goes to a catch-up watch, whose refusal (or
        not) tells whether the log has its revision."""
        reading = self._reading_current
        if reading is None:
            reading = asyncio.create_task(self.source.current_revision(), name="current-revision")
            self._reading_current = reading
            reading.add_done_callback(self._read_current)
        # Shielded: a client that goes away does not end the call the others wait for.
        return await asyncio.shield(reading)

    def _read_current(self, reading: asyncio.Task[int]) -> None:
        if self._reading_current is reading:
            self._reading_current = None
        # Retrieved here, so that a refusal nobody waits for any more is not logged as lost.
        if not reading.cancelled():
            reading.exception()

    def _check_filters(self, holder: Caller, watch: SharedWatch | None) -> None:
        """Refuse ``holder`` a stream on ``watch`` (None: a new one) beyond the filters'
        bounds: every filter counts for the bound of all, those of a caller's streams for
        its share."""
        events = self.config
        if watch is None and len(self._watches) >= events.max_filters:
            raise exhausted(
                "TOO_MANY_FILTERS",
                f"the gateway watches at most {events.max_filters} filters at once",
                maxFilters=str(events.max_filters),
            )
        if holder.service or (watch is not None and watch.holds(holder)):
            return
        share = events.max_filters_per_caller or max(1, events.max_filters // 2)
        if sum(held.holds(holder) for held in self._watches.values()) >= share:
            raise exhausted(
                "TOO_MANY_FILTERS_FOR_CALLER",
                f"the gateway watches at most {share} filters for one caller's streams at "
                "once; close a stream, or watch with a wider filter",
                maxFiltersPerCaller=str(share),
            )

    def stream_closed(self, holder: Caller) -> None:
        self._slots.give_back(holder)

    def forget(self, watch: SharedWatch, task: asyncio.Task[None]) -> None:
        """Stop sharing ``watch``, which has ended; ``task`` is its upstream reader."""
        if self._watches.get(watch.filter) is watch:
            del self._watches[watch.filter]
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """End every subscription (UNAVAILABLE) and every upstream watch."""
        for watch in list(self._watches.values()):
            watch.end(_closing())
        for task in list(self._stopping):
            await cancel_and_wait(task)
        await cancel_and_wait(self._reading_current)


def _too_many_streams(full: SlotsFull, limit: int) -> Refusal:
    if full is SlotsFull.CALLER:
        return exhausted(
            "TOO_MANY_EVENT_STREAMS_FOR_CALLER",
            f"the gateway serves at most {limit} event streams of one caller",
            maxStreamsPerCaller=str(limit),
        )
    return exhausted(
        "TOO_MANY_EVENT_STREAMS",
        f"the gateway serves at most {limit} event streams",
        maxStreams=str(limit),
    )
