"""Background upkeep: expired leases back to PENDING, and event-log compaction.

Runs inside the service, so recovery after a crashed worker needs no user cron.
"""

from __future__ import annotations

import asyncio
import logging

from analysis_service.config import WatchConfig
from analysis_service.domain.clock import SYSTEM_CLOCK, Clock
from analysis_service.domain.queue import JobQueue
from analysis_service.errors import AnalysisError
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

# Keeps a zero compaction interval from turning the loop into a busy one.
MIN_PAUSE = 0.05


class Maintenance:
    """Reaps expired leases every few seconds and compacts the event log every
    ``compaction_interval`` (a minute by default)."""

    def __init__(self, queue: JobQueue, watch: WatchConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self._queue = queue
        self._watch = watch
        self._clock = clock
        self._reap_interval = max(0.2, min(queue.lease_seconds / 4, 5.0))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="maintenance")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        # Each chore on its own clock: a compaction interval shorter than the reap interval
        # is honoured rather than rounded up to it. A chore that fails waits its interval too.
        next_reap = next_compaction = 0.0
        while True:
            now = self._clock.monotonic()
            try:
                if now >= next_reap:
                    next_reap = now + self._reap_interval
                    await self._queue.reap_expired_leases()
                if now >= next_compaction:
                    next_compaction = now + self._watch.compaction_interval
                    await self._queue.compact_events(
                        max_age=self._watch.retention_seconds,
                        max_events=self._watch.retention_events,
                    )
            except AnalysisError as exc:
                logger.error("maintenance failed, will try again: %s", exc)
            pause = min(next_reap, next_compaction) - self._clock.monotonic()
            await asyncio.sleep(max(MIN_PAUSE, pause))
