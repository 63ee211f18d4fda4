"""Exponential backoff with jitter for reconnecting clients (outbox, status mirror, CLI watch)
and for retried deliveries (webhooks)."""

from __future__ import annotations

import random

# 2**64 times any sensible initial delay is past any maximum: more doublings change nothing,
# and bounding them keeps a days-long outage from overflowing the float.
_MAX_DOUBLINGS = 64


def jittered_delay(initial: float, maximum: float, failures: int) -> float:
    """The delay after ``failures`` earlier failures (0 for the first retry): ``initial``
    doubling up to ``maximum``, jittered to 50-100 % so that many clients do not retry in
    step."""
    delay = min(maximum, initial * 2.0 ** min(failures, _MAX_DOUBLINGS))
    return delay * random.uniform(0.5, 1.0)


class Backoff:
    """Delays growing from ``initial`` to ``maximum`` over successive failures, jittered."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        delay = jittered_delay(self._initial, self._maximum, self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
