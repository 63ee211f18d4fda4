"""Log lines a client can make us write, at most one per kind and interval.

A client that sends bytes that do not parse, or a burst that meets a service's bounds, must
not fill the log: each kind of line (a key) is written at most once per interval, and the
next one says how many were left out meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Lines to ``logger``, at most one per key every ``interval`` seconds of ``clock``."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        # Per key: when its last line was written, and how many were left out since.
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        self.log(logging.WARNING, key, message, *args)

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        """A line at ``level``; keys are kept, so they must be few (never a client's text)."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        suffix = f" ({skipped} more since the last such line)" if skipped else ""
        self._logger.log(level, message + suffix, *args)
