"""A watcher's buffer: when a watcher that does not keep up is cut off, and when a burst is
forgiven (``Subscription.offer``). The hub is driven directly; the whole service's behaviour
with a stalled client is in test_watch_scale."""

from __future__ import annotations

import itertools

import pytest

from analysis_service.domain.hub import StatusHub, Subscription, WatchFilter
from analysis_service.domain.models import JobStatus, StatusEvent
from analysis_service.errors import WatcherTooSlow

BUFFER = 8

_revisions = itertools.count(1)


def commit(size: int) -> list[StatusEvent]:
    return [
        StatusEvent(
            revision=next(_revisions),
            media_id=f"media-{n}",
            owner_id="owner",
            status=JobStatus.PROCESSING,
            previous_status=JobStatus.PENDING,
            attempt=1,
            event_time=0.0,
        )
        for n in range(size)
    ]


async def take(watcher: Subscription, count: int) -> None:
    for _ in range(count):
        assert await watcher.next(0) is not None


async def assert_cut_off(hub: StatusHub, watcher: Subscription) -> None:
    with pytest.raises(WatcherTooSlow):
        await watcher.next(0)
    assert hub.watcher_count == 0


async def test_a_watcher_falling_behind_commit_by_commit_is_cut_off_a_buffer_behind() -> None:
    hub = StatusHub(buffer_size=BUFFER, max_watchers=10)
    watcher = hub.subscribe(WatchFilter())
    hub.publish(commit(3))
    await take(watcher, 3)
    # Then it stops reading. Commits of three: 3, 6, then 9 behind. The third takes it past
    # its buffer, but it was already more than half a buffer behind: no burst to forgive.
    for _ in range(3):
        hub.publish(commit(3))
    assert hub.watcher_count == 1
    hub.publish(commit(3))
    await assert_cut_off(hub, watcher)


async def test_a_commit_larger_than_the_buffer_does_not_cut_off_a_watcher_that_keeps_up() -> None:
    hub = StatusHub(buffer_size=BUFFER, max_watchers=10)
    watcher = hub.subscribe(WatchFilter())
    hub.publish(commit(2))
    # Two behind (keeping up) when a retry of 20 jobs commits: taken whole.
    hub.publish(commit(20))
    # The commits right after it count from its end: up to a buffer more while it reads.
    for _ in range(BUFFER):
        hub.publish(commit(1))
    assert hub.watcher_count == 1
    await take(watcher, 2 + 20 + BUFFER)
    assert await watcher.next(0) is None


async def test_a_burst_is_forgiven_once_until_it_has_been_read() -> None:
    hub = StatusHub(buffer_size=BUFFER, max_watchers=10)
    watcher = hub.subscribe(WatchFilter())
    hub.publish(commit(20))
    await take(watcher, 19)
    # One event of the burst still unread: the next large commit is no new burst. It is
    # taken (the count, from the burst's end, is still 0), and the one after cuts it off.
    hub.publish(commit(20))
    assert hub.watcher_count == 1
    hub.publish(commit(1))
    await assert_cut_off(hub, watcher)


async def test_once_the_burst_is_read_the_next_one_is_forgiven_again() -> None:
    hub = StatusHub(buffer_size=BUFFER, max_watchers=10)
    watcher = hub.subscribe(WatchFilter())
    hub.publish(commit(20))
    await take(watcher, 20)
    hub.publish(commit(20))
    hub.publish(commit(1))
    assert hub.watcher_count == 1
    await take(watcher, 21)
