"""Delivery pacing: the workers' commits take turns with the fan-out (``StatusHub.paced``),
each once the watchers have taken the changes before it, never waiting for a watcher that
stopped reading.

The hub and its subscriptions are driven directly here; the whole service's behaviour
with a stalled watcher (workers keep their pace) is in test_watch_scale, and the effect on
delivery delay is measured by ``python -m bench --only fanout``.
"""

from __future__ import annotations

import asyncio
import itertools

from analysis_service.domain.hub import PACED_BACKLOG, StatusHub, Subscription, WatchFilter
from analysis_service.domain.models import JobStatus, StatusEvent
from analysis_service.errors import WatcherTooSlow

# Long enough that a test relying on it to return would time out instead.
FOREVER = 60.0
SOON = 5.0

_revisions = itertools.count(1)


def change() -> StatusEvent:
    return StatusEvent(
        revision=next(_revisions),
        media_id="media-1",
        owner_id="owner",
        status=JobStatus.PROCESSING,
        previous_status=JobStatus.PENDING,
        attempt=1,
        event_time=0.0,
    )


def hub_with(watchers: int) -> tuple[StatusHub, list[Subscription]]:
    hub = StatusHub(buffer_size=1024, max_watchers=1000)
    return hub, [hub.subscribe(WatchFilter()) for _ in range(watchers)]


class Commit:
    """A paced block held open until ``finish``: it stands for one worker's commit."""

    def __init__(self, hub: StatusHub, max_wait: float = FOREVER) -> None:
        self.entered = asyncio.Event()
        self._release = asyncio.Event()
        self.task = asyncio.create_task(self._run(hub, max_wait))

    async def _run(self, hub: StatusHub, max_wait: float) -> None:
        async with hub.paced(max_wait):
            self.entered.set()
            await self._release.wait()

    async def runs(self) -> None:
        await asyncio.wait_for(self.entered.wait(), SOON)

    async def is_waiting(self) -> bool:
        """Let the loop run a little, then tell whether the block has yet to start."""
        for _ in range(5):
            await asyncio.sleep(0)
        return not self.entered.is_set()

    async def finish(self) -> None:
        self._release.set()
        await asyncio.wait_for(self.task, SOON)


async def take_all(watchers: list[Subscription]) -> None:
    """Each watcher takes every event it holds (a zero wait ends at the first idle one)."""
    for watcher in watchers:
        while await watcher.next(0) is not None:
            pass


async def test_without_watchers_or_with_everything_taken_commits_go_at_once() -> None:
    hub, _ = hub_with(0)
    hub.publish([change()])
    first, second = Commit(hub), Commit(hub)
    await first.runs()
    await second.runs()  # no turns to take without watchers
    await first.finish()
    await second.finish()

    hub, watchers = hub_with(3)
    hub.publish([change()])
    await take_all(watchers)
    commit = Commit(hub)
    await commit.runs()
    await commit.finish()


async def test_a_commit_waits_until_the_last_watcher_has_taken_the_changes() -> None:
    hub, watchers = hub_with(3)
    hub.publish([change(), change()])
    commit = Commit(hub)
    for watcher in watchers:
        assert await commit.is_waiting()
        await watcher.next(FOREVER)
    # Each still holds the second change.
    assert await commit.is_waiting()
    await take_all(watchers)
    await commit.runs()
    await commit.finish()


async def test_commits_take_turns_each_after_the_fan_out_of_the_one_before() -> None:
    hub, watchers = hub_with(3)
    first, second = Commit(hub), Commit(hub)
    await first.runs()
    assert await second.is_waiting()
    # The first publishes a change: the second waits for the watchers to take it.
    hub.publish([change()])
    await first.finish()
    assert await second.is_waiting()
    await take_all(watchers)
    await second.runs()
    # A commit that publishes nothing (a claim with no job due) passes the turn at once.
    third = Commit(hub)
    assert await third.is_waiting()
    await second.finish()
    await third.runs()
    await third.finish()


async def test_a_commit_cancelled_while_waiting_leaves_the_turn_free() -> None:
    hub, _watchers = hub_with(2)
    first, cancelled = Commit(hub), Commit(hub)
    await first.runs()
    assert await cancelled.is_waiting()
    cancelled.task.cancel()
    later = Commit(hub)
    await first.finish()
    await later.runs()
    await later.finish()
    assert cancelled.task.cancelled()


async def test_a_commit_waits_no_longer_than_its_bound() -> None:
    hub, _ = hub_with(1)
    hub.publish([change()])
    bounded = Commit(hub, max_wait=0.05)
    await bounded.runs()
    # Zero turns pacing off.
    unpaced = Commit(hub, max_wait=0)
    await unpaced.runs()
    await bounded.finish()
    await unpaced.finish()


async def test_a_watcher_that_stopped_reading_is_not_waited_for() -> None:
    hub, (_stalled, reader) = hub_with(2)
    for _ in range(PACED_BACKLOG):
        hub.publish([change()])
        await reader.next(FOREVER)
    # Within PACED_BACKLOG events it may just be slow to take them.
    commit = Commit(hub)
    assert await commit.is_waiting()
    # Beyond it, it is not reading: the workers go on.
    hub.publish([change()])
    await reader.next(FOREVER)
    await commit.runs()
    await commit.finish()


async def test_ended_and_closed_watchers_are_not_waited_for() -> None:
    hub, (cut_off, gone) = hub_with(2)
    hub.publish([change()])
    commit = Commit(hub)
    assert await commit.is_waiting()
    cut_off.end(WatcherTooSlow("too slow"))
    assert await commit.is_waiting()
    gone.close()
    await commit.runs()
    await commit.finish()


async def test_one_in_a_hundred_stragglers_does_not_hold_the_workers() -> None:
    hub, watchers = hub_with(300)
    hub.publish([change()])
    # Three of 300 never take it: within 1 %.
    await take_all(watchers[3:])
    commit = Commit(hub)
    await commit.runs()
    await commit.finish()

    hub.publish([change()])
    await take_all(watchers[3:-1])
    # Four of 300 behind: more than 1 %.
    commit = Commit(hub)
    assert await commit.is_waiting()
    await take_all(watchers[-1:])
    await commit.runs()
    await commit.finish()
