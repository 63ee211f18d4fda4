"""Delivery pacing: workers wait, briefly, for the watchers to take the published changes
(``StatusHub.delivered``), and never for a watcher that stopped reading.

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


async def is_waiting(pacing: asyncio.Task[None]) -> bool:
    """Let the loop run a little, then tell whether ``pacing`` is still waiting."""
    for _ in range(5):
        await asyncio.sleep(0)
    return not pacing.done()


async def test_returns_at_once_with_no_watchers_or_everything_taken() -> None:
    hub, _ = hub_with(0)
    hub.publish([change()])
    await asyncio.wait_for(hub.delivered(FOREVER), SOON)

    hub, watchers = hub_with(3)
    hub.publish([change()])
    for watcher in watchers:
        assert await watcher.next(FOREVER) is not None
    await asyncio.wait_for(hub.delivered(FOREVER), SOON)


async def test_waits_until_the_last_watcher_has_taken_the_change() -> None:
    hub, watchers = hub_with(3)
    hub.publish([change(), change()])
    pacing = asyncio.create_task(hub.delivered(FOREVER))
    for watcher in watchers:
        assert await is_waiting(pacing)
        await watcher.next(FOREVER)
    # Each holds one more: still delivering.
    assert await is_waiting(pacing)
    for watcher in watchers:
        await watcher.next(FOREVER)
    await asyncio.wait_for(pacing, SOON)


async def test_waits_no_longer_than_its_bound() -> None:
    hub, _ = hub_with(1)
    hub.publish([change()])
    await asyncio.wait_for(hub.delivered(0.05), SOON)
    # Zero turns pacing off.
    await asyncio.wait_for(hub.delivered(0), SOON)


async def test_a_watcher_that_stopped_reading_is_not_waited_for() -> None:
    hub, (_stalled, reader) = hub_with(2)
    for _ in range(PACED_BACKLOG):
        hub.publish([change()])
        await reader.next(FOREVER)
    # Within PACED_BACKLOG events it may just be slow to take them.
    pacing = asyncio.create_task(hub.delivered(FOREVER))
    assert await is_waiting(pacing)
    # Beyond it, it is not reading: the workers go on.
    hub.publish([change()])
    await reader.next(FOREVER)
    await asyncio.wait_for(pacing, SOON)
    await asyncio.wait_for(hub.delivered(FOREVER), SOON)


async def test_ended_and_closed_watchers_are_not_waited_for() -> None:
    hub, (cut_off, gone) = hub_with(2)
    hub.publish([change()])
    pacing = asyncio.create_task(hub.delivered(FOREVER))
    assert await is_waiting(pacing)
    cut_off.end(WatcherTooSlow("too slow"))
    assert await is_waiting(pacing)
    gone.close()
    await asyncio.wait_for(pacing, SOON)


async def test_one_in_a_hundred_stragglers_does_not_hold_the_workers() -> None:
    hub, watchers = hub_with(300)
    hub.publish([change()])
    # Three of 300 never take it: within 1 %.
    for watcher in watchers[3:]:
        await watcher.next(FOREVER)
    await asyncio.wait_for(hub.delivered(FOREVER), SOON)

    hub.publish([change()])
    for watcher in watchers[3:-1]:
        await watcher.next(FOREVER)
    # Four of 300 behind: more than 1 %.
    pacing = asyncio.create_task(hub.delivered(FOREVER))
    assert await is_waiting(pacing)
    await watchers[-1].next(FOREVER)
    await asyncio.wait_for(pacing, SOON)
