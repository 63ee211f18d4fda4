"""Completed and failed items per minute over the last hour, for the dashboard's chart.

Counted from the gateway's own watch of every change (the event log is the whole
cluster's), so the figures cover every analysis replica. They start when the gateway does:
the event log is kept for resuming, not for statistics, and reading an hour back from it on
every start would cost more than the chart is worth.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from mediatag_common.backoff import Backoff
from mediatag_common.callers import Caller
from mediatag_common.tasks import cancel_and_wait
from web_gateway.domain.events import Change, WatchFilter
from web_gateway.domain.watches import SharedWatches
from web_gateway.errors import Refusal

logger = logging.getLogger(__name__)

MINUTE = 60.0
_COUNTED = ("COMPLETED", "FAILED")
# The recorder's own event stream: one of the clients' places, as a client's would be.
RECORDER = Caller("(throughput recorder)")


@dataclass(frozen=True)
class MinuteCount:
    """The changes to COMPLETED and to FAILED in the minute starting at ``start``."""

    start: float
    completed: int
    failed: int


class Throughput:
    """Terminal changes by minute, for the last ``minutes`` minutes."""

    def __init__(self, minutes: int = 60, clock: Callable[[], float] = time.time) -> None:
        self._minutes = minutes
        self._clock = clock
        self.since = clock()
        self._counts: dict[int, list[int]] = {}

    def record(self, change: Change) -> None:
        if change.status not in _COUNTED:
            return
        minute = math.floor(change.event_time / MINUTE)
        if minute <= self._current_minute() - self._minutes:
            return
        counts = self._counts.setdefault(minute, [0, 0])
        counts[_COUNTED.index(change.status)] += 1
        self._prune()

    def _current_minute(self) -> int:
        return math.floor(self._clock() / MINUTE)

    def _prune(self) -> None:
        oldest = self._current_minute() - self._minutes
        for minute in [m for m in self._counts if m <= oldest]:
            del self._counts[minute]

    def last_hour(self) -> list[MinuteCount]:
        """One count per minute, oldest first, the current (unfinished) minute last."""
        self._prune()
        now = self._current_minute()
        return [
            MinuteCount(minute * MINUTE, *self._counts.get(minute, (0, 0)))
            for minute in range(now - self._minutes + 1, now + 1)
        ]


class ThroughputRecorder:
    """Feeds :class:`Throughput` from a subscription to every change, resubscribing (from
    where it was, or from now when that is gone) when the subscription ends."""

    def __init__(self, watches: SharedWatches, throughput: Throughput, idle: float) -> None:
        self._watches = watches
        self._throughput = throughput
        self._idle = idle
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="throughput-recorder")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        after: int | None = None
        backoff = Backoff(0.5, 30.0)
        while True:
            try:
                subscription = await self._watches.subscribe(
                    WatchFilter(), after=after, visible=None, holder=RECORDER
                )
            except Refusal as refusal:
                logger.info("throughput: cannot watch yet (%s)", refusal.status.message)
                await asyncio.sleep(backoff.next_delay())
                continue
            try:
                while True:
                    item = await subscription.next(self._idle)
                    backoff.reset()
                    if isinstance(item, Change):
                        self._throughput.record(item)
                    after = item.revision
            except Refusal as refusal:
                logger.info("throughput: watch ended (%s)", refusal.status.message)
                if refusal.resync:
                    after = None
            finally:
                await subscription.close()
            await asyncio.sleep(backoff.next_delay())
