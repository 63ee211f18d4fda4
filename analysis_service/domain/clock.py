"""Where the domain's rules read the time, so tests can run them on a fake clock.

The rules that wait (backoff, lease renewal, reaping, rate limits, the analyser timeout)
sleep on the event loop; the readings they compare with come from a :class:`Clock`. The
system's is the default; a test passes one that follows a fast-forwarded event loop.
"""

from __future__ import annotations

import collections
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


class RemoteClock:
    """Another machine's clock (the database's) as this process follows it from the answers
    that read it, so that an instant on that clock can be waited for on ours.

    An answer that read the remote clock as ``read_at`` and arrived at ``received`` (our
    monotonic clock) shows the offset between the clocks plus that answer's time in transit.
    The smallest of the last ``samples`` is the estimate (Cristian's algorithm keeping the
    quickest answer): a slow answer then no longer makes the wait it carries late by its own
    transit. The window of samples lets the estimate follow the remote clock if it is set.
    """

    def __init__(self, clock: Clock, *, samples: int = 32) -> None:
        self._clock = clock
        self._offsets: collections.deque[float] = collections.deque(maxlen=samples)

    def observe(self, read_at: float) -> None:
        """Take an answer, just received, that read the remote clock as ``read_at``."""
        self._offsets.append(self._clock.monotonic() - read_at)

    def until(self, instant: float) -> float:
        """Seconds from now until ``instant`` on the remote clock (negative once past); needs
        one answer observed."""
        return instant + min(self._offsets) - self._clock.monotonic()
