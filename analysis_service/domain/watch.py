"""WatchStatus: resumable, ordered, gap-free streams of status events (SPEC §6).

A watch registers its live subscription first, then reads what it must catch up on from
the event log (or the current state, a page at a time), and ends that with a bookmark;
events that arrive live meanwhile are skipped by revision, so nothing is missed and nothing
is sent twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from analysis_service.domain.hub import StatusHub, Subscription, WatchFilter
from analysis_service.domain.models import Bookmark, JobStatus, StatusEvent
from analysis_service.domain.store import EventFilter, LogCompacted, QueueStore
from analysis_service.errors import InvalidArgument, RevisionAhead, RevisionCompacted
from mediatag_common.callers import ANONYMOUS, Caller
from mediatag_common.errors import FieldViolation

logger = logging.getLogger(__name__)

CATCH_UP_PAGE = 500
# Initial states read at once: what a stream holds of them (see _Snapshot).
STATE_PAGE = 500


@dataclass(frozen=True)
class WatchRequest:
    media_ids: frozenset[str] = frozenset()
    owner_id: str = ""
    start_revision: int = 0
    send_initial_state: bool = False
    until_terminal: bool = False
    include_embedding: bool = False
    # The owners the caller's token may see (None = all): other owners' items are left out
    # as if they did not exist.
    allowed_owners: frozenset[str] | None = None


class _TerminalTracker:
    """Knows when every listed item of an ``until_terminal`` watch is terminal.

    It keeps each item's newest status by revision: a watch resuming from a revision replays
    changes older than the states it read, which must not take them back.
    """

    def __init__(self, media_ids: frozenset[str]) -> None:
        self._status: dict[str, tuple[int, JobStatus] | None] = dict.fromkeys(media_ids)

    def see(self, event: StatusEvent) -> None:
        known = self._status.get(event.media_id)
        if known is None or event.revision > known[0]:
            self._status[event.media_id] = (event.revision, event.status)

    @property
    def done(self) -> bool:
        return all(known is not None and known[1].terminal for known in self._status.values())


class _Snapshot:
    """The state of a watch's items as of one revision, read a page at a time as it is sent.

    The stream holds one page however many items match, and reads the next only when the
    client has taken the one before (its generator runs as the client reads). The snapshot is
    at ``revision``, the log's at the first read. Pages are read by media id, an order that
    changes do not move items in, so each item is read once. An item whose state is newer
    than the snapshot when its page is read (changed, or created, since) is left out: its
    changes after the snapshot's revision come live, after the bookmark, every one of them.
    So every state sent is as of the snapshot, and none is newer than the bookmark that ends
    them (a client resuming from that bookmark misses nothing).
    """

    def __init__(
        self,
        store: QueueStore,
        request: WatchRequest,
        subscription: Subscription,
        visible: Callable[[StatusEvent], bool] | None,
    ) -> None:
        self._store = store
        self._request = request
        self._subscription = subscription
        self._visible = visible
        self.revision = 0
        self.compacted_through = 0

    async def states(self) -> AsyncIterator[StatusEvent]:
        events = EventFilter(self._request.media_ids, self._request.owner_id)
        after = ""
        first = True
        while True:
            page = await self._store.state_page(
                events,
                after_media_id=after,
                limit=STATE_PAGE,
                with_embedding=self._request.include_embedding,
            )
            if first:
                self.revision, self.compacted_through = page.revision, page.compacted_through
                first = False
            for state in page.states:
                if state.revision > self.revision:
                    continue
                if self._visible is not None and not self._visible(state):
                    continue
                yield state
            if len(page.states) < STATE_PAGE:
                return
            after = page.states[-1].media_id
            # A watcher cut off meanwhile (too slow) reads no further.
            self._subscription.raise_if_ended()


class WatchStream(contextlib.AbstractAsyncContextManager["WatchStream"]):
    """One open watch: iterate it for the optional initial state, the catch-up from the log
    and then live events; leaving its ``async with`` block ends its subscription."""

    def __init__(
        self, subscription: Subscription, items: AsyncGenerator[StatusEvent | Bookmark, None]
    ) -> None:
        self._subscription = subscription
        self._items = items

    def __aiter__(self) -> AsyncIterator[StatusEvent | Bookmark]:
        return self._items

    async def __aexit__(self, *exc_info: object) -> None:
        self._subscription.close()
        await self._items.aclose()


class StatusWatcher:
    """Serves watch streams from the event log and the hub."""

    def __init__(self, store: QueueStore, hub: StatusHub, *, bookmark_interval: float) -> None:
        self._store = store
        self._hub = hub
        self._bookmark_interval = bookmark_interval

    @property
    def current_revision(self) -> int:
        return self._hub.current_revision

    def validate(self, request: WatchRequest) -> None:
        if request.start_revision < 0:
            raise InvalidArgument(
                "start_revision must not be negative",
                reason="INVALID_REVISION",
                field_violations=[FieldViolation("start_revision", "must be >= 0")],
            )
        if request.until_terminal and not request.media_ids:
            raise InvalidArgument(
                "until_terminal needs media_ids",
                reason="MEDIA_IDS_REQUIRED",
                field_violations=[FieldViolation("media_ids", "required with until_terminal")],
            )

    def watch(self, request: WatchRequest, holder: Caller = ANONYMOUS) -> WatchStream:
        """A stream registered with the hub at once for ``holder`` (refused here when its
        watcher slots are taken), so a caller can open it before telling its client the stream
        is open."""
        self.validate(request)
        if not request.owner_id and request.allowed_owners and len(request.allowed_owners) == 1:
            # One allowed owner is an owner filter the queries can use.
            (only,) = request.allowed_owners
            request = dataclasses.replace(request, owner_id=only)
        watch_filter = WatchFilter(request.media_ids, request.owner_id, request.allowed_owners)
        subscription = self._hub.subscribe(watch_filter, holder)
        return WatchStream(subscription, self._stream(request, subscription))

    async def _stream(
        self, request: WatchRequest, subscription: Subscription
    ) -> AsyncGenerator[StatusEvent | Bookmark, None]:
        visible = subscription.filter.matches if request.allowed_owners is not None else None
        tracker = _TerminalTracker(request.media_ids) if request.until_terminal else None
        if request.send_initial_state or tracker:
            snapshot = _Snapshot(self._store, request, subscription, visible)
            async for state in snapshot.states():
                if tracker:
                    tracker.see(state)
                if request.send_initial_state:
                    yield state
            snapshot_revision, compacted_through = snapshot.revision, snapshot.compacted_through
        else:
            snapshot_revision, compacted_through = await self._store.log_bounds()

        if request.send_initial_state:
            yield Bookmark(snapshot_revision, initial_state_end=True)
            last = snapshot_revision
        elif request.start_revision:
            if request.start_revision < compacted_through:
                raise _compacted(request.start_revision, compacted_through, snapshot_revision)
            if request.start_revision > snapshot_revision:
                # A revision a client holds was committed before it got it: one from the
                # future means this is not the log it was reading. Resuming would skip the
                # new log's first events.
                raise RevisionAhead(
                    f"revision {request.start_revision} is ahead of the current revision "
                    f"{snapshot_revision}: the event log was replaced. "
                    "Watch again with send_initial_state.",
                    metadata=_bounds(compacted_through, snapshot_revision),
                )
            last = request.start_revision
            async for event in self._catch_up(request, last):
                if visible is not None and not visible(event):
                    continue
                if tracker:
                    tracker.see(event)
                yield event
                last = event.revision
            # The replay is over: a bookmark tells how far. A client whose filter matched
            # nothing since its revision learns now, not at the next idle bookmark, that it is
            # caught up (a web gateway holds one of a few catch-up slots until it knows).
            last = max(last, snapshot_revision)
            yield Bookmark(last)
        else:
            last = snapshot_revision

        while tracker is None or not tracker.done:
            live = await subscription.next(self._bookmark_interval)
            if live is None:
                yield Bookmark(max(self._hub.current_revision, last))
                continue
            if live.revision <= last:
                continue
            if tracker:
                tracker.see(live)
            yield live
            last = live.revision

    async def _catch_up(self, request: WatchRequest, after: int) -> AsyncIterator[StatusEvent]:
        events = EventFilter(request.media_ids, request.owner_id)
        while True:
            try:
                page = await self._store.events_after(
                    after, events, limit=CATCH_UP_PAGE, with_embedding=request.include_embedding
                )
            except LogCompacted as exc:
                raise _compacted(exc.after, exc.compacted_through, exc.revision) from None
            for event in page:
                yield event
                after = event.revision
            if len(page) < CATCH_UP_PAGE:
                return


def _compacted(revision: int, compacted_through: int, current: int) -> RevisionCompacted:
    return RevisionCompacted(
        f"revision {revision} is compacted; the log starts after {compacted_through}. "
        "Watch again with send_initial_state.",
        metadata=_bounds(compacted_through, current),
    )


def _bounds(compacted_through: int, current: int) -> dict[str, str]:
    """The ErrorInfo metadata of an out-of-range revision: what the log holds now."""
    return {"oldestRevision": str(compacted_through + 1), "currentRevision": str(current)}
