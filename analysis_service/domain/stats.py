"""Recent throughput and job durations, for the queue status and its estimated wait.

The workers record here; this replica's heartbeat (:mod:`analysis_service.domain.replicas`)
reads, so that :mod:`analysis_service.domain.queue_status` adds up every replica's.
"""

from __future__ import annotations

import collections
import time

WINDOW = 60.0


class Throughput:
    """Jobs that reached a terminal status in the last minute, and how long they took."""

    def __init__(self) -> None:
        self._finished: collections.deque[tuple[float, float]] = collections.deque()
        self._seconds = 0.0

    def record(self, duration: float) -> None:
        now = time.monotonic()
        self._finished.append((now, duration))
        self._seconds += duration
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._finished and self._finished[0][0] < now - WINDOW:
            self._seconds -= self._finished.popleft()[1]
        if not self._finished:
            self._seconds = 0.0  # no rounding left over

    def last_minute(self) -> tuple[int, float]:
        """The jobs finished in the last minute, and the seconds they took, summed."""
        self._expire(time.monotonic())
        return len(self._finished), self._seconds
