"""Recent throughput and job durations, for the queue status and its estimated wait.

The workers record here; :mod:`analysis_service.domain.queue_status` reads.
"""

from __future__ import annotations

import collections
import time

WINDOW = 60.0


class Throughput:
    """Jobs that reached a terminal status in the last minute, and how long they took."""

    def __init__(self) -> None:
        self._finished: collections.deque[tuple[float, float]] = collections.deque()

    def record(self, duration: float) -> None:
        now = time.monotonic()
        self._finished.append((now, duration))
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._finished and self._finished[0][0] < now - WINDOW:
            self._finished.popleft()

    def last_minute(self) -> int:
        self._expire(time.monotonic())
        return len(self._finished)

    def mean_duration(self) -> float | None:
        self._expire(time.monotonic())
        if not self._finished:
            return None
        return sum(d for _, d in self._finished) / len(self._finished)
