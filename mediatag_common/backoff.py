"""Exponential backoff with jitter for reconnecting clients (outbox, status mirror, CLI watch)."""

from __future__ import annotations

import random


class Backoff:
    """Delays growing from ``initial`` to ``maximum``, each jittered to 50-100 % so that
    restarts of many clients do not retry in step."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self.failures = 0
        self._doublings = 0

    def next_delay(self) -> float:
        delay = min(self._maximum, self._initial * 2.0**self._doublings)
        self.failures += 1
        if delay < self._maximum:
            # Bounded, so that a days-long outage cannot overflow the float.
            self._doublings += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0
        self._doublings = 0
