"""Where the domain's rules read the time, so tests can run them on a fake clock.

The rules that wait (backoff, lease renewal, reaping, rate limits, the analyser timeout)
sleep on the event loop; the readings they compare with come from a :class:`Clock`. The
system's is the default; a test passes one that follows a fast-forwarded event loop.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock instants and monotonic durations."""

    def time(self) -> float:
        """Seconds since the epoch: instants that are shown or stored."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: durations and schedules."""
        ...


class SystemClock:
    """The machine's clocks (``time.time`` and ``time.monotonic``)."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
