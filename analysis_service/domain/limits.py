"""One aiolimiter per upstream API, slowed down by quota errors.

A limit of R calls/s with bursts of B is ``AsyncLimiter(B, B / R)``: the bucket holds B and
leaks R per second. ``AsyncLimiter(R, 1)`` would start full and let 2R calls through in the
first second.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Mapping, Sequence

from aiolimiter import AsyncLimiter

from analysis_service.analyzers.base import ApiLimit
from analysis_service.config import RateLimitConfig
from analysis_service.domain.models import RateLimitState

logger = logging.getLogger(__name__)

# How long an API pauses after a quota error that names no retry delay; doubles on each
# consecutive quota error, and resets after a call goes through.
QUOTA_BACKOFF_INITIAL = 1.0
QUOTA_BACKOFF_MAX = 60.0
USE_WINDOW = 10.0


class _ApiLimiter:
    def __init__(self, api: str, config: RateLimitConfig) -> None:
        self.api = api
        self.config = config
        self.limiter = AsyncLimiter(config.burst, config.burst / config.rate_per_second)
        self.throttled_until = 0.0
        self.quota_errors = 0
        self.consecutive_quota_errors = 0
        self.recent_calls: collections.deque[float] = collections.deque()

    async def acquire(self) -> None:
        # A quota error may extend the pause while we sleep, hence the loop.
        while (pause := self.throttled_until - time.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(pause)
        await self.limiter.acquire()
        now = time.monotonic()
        self.recent_calls.append(now)
        while self.recent_calls and self.recent_calls[0] < now - USE_WINDOW:
            self.recent_calls.popleft()

    def current_use(self) -> float:
        now = time.monotonic()
        calls = sum(1 for t in self.recent_calls if t >= now - USE_WINDOW)
        return min(1.0, calls / (self.config.rate_per_second * USE_WINDOW))


class RateLimits:
    """The limiters of the analyser's upstream APIs; ``acquire(api)`` waits for a slot."""

    def __init__(
        self,
        defaults: Sequence[ApiLimit],
        overrides: Mapping[str, RateLimitConfig],
    ) -> None:
        configs = {d.api: RateLimitConfig(d.rate_per_second, d.burst) for d in defaults}
        unknown = set(overrides) - set(configs)
        if unknown:
            raise ValueError(
                f"rate limit for unknown API {', '.join(sorted(unknown))}; "
                f"this analyser calls {', '.join(sorted(configs))}"
            )
        configs.update(overrides)
        for api, config in configs.items():
            if config.rate_per_second <= 0 or config.burst < 1:
                raise ValueError(f"rate limit of {api} must be > 0 with burst >= 1")
        self._limiters = {api: _ApiLimiter(api, config) for api, config in configs.items()}

    def _limiter(self, api: str) -> _ApiLimiter:
        try:
            return self._limiters[api]
        except KeyError:
            raise ValueError(f"no rate limit configured for API {api!r}") from None

    async def acquire(self, api: str) -> None:
        await self._limiter(api).acquire()

    def succeeded(self, apis: Sequence[str]) -> None:
        """Calls went through: quota backoff starts again from its initial value."""
        for api in apis:
            self._limiter(api).consecutive_quota_errors = 0

    def quota_exceeded(self, api: str, retry_after: float | None) -> float:
        """Pause ``api`` after a quota error; returns how long it is paused."""
        limiter = self._limiter(api)
        limiter.quota_errors += 1
        limiter.consecutive_quota_errors += 1
        pause = retry_after
        if pause is None:
            exponent = limiter.consecutive_quota_errors - 1
            pause = min(QUOTA_BACKOFF_MAX, QUOTA_BACKOFF_INITIAL * 2.0**exponent)
        limiter.throttled_until = max(limiter.throttled_until, time.time() + pause)
        logger.warning("quota exceeded on %s: pausing it for %.1f s", api, pause)
        return pause

    def quota_error_counts(self) -> dict[str, int]:
        """Quota errors so far by API; plain reads, safe from a metrics scrape's thread."""
        return {api: limiter.quota_errors for api, limiter in self._limiters.items()}

    def min_rate(self) -> float:
        """The lowest configured rate: an upper bound on jobs per second."""
        return min(limiter.config.rate_per_second for limiter in self._limiters.values())

    def snapshot(self) -> tuple[RateLimitState, ...]:
        now = time.time()
        return tuple(
            RateLimitState(
                api=limiter.api,
                rate_per_second=limiter.config.rate_per_second,
                burst=limiter.config.burst,
                current_use=limiter.current_use(),
                throttled_until=limiter.throttled_until if limiter.throttled_until > now else None,
                quota_errors=limiter.quota_errors,
            )
            for limiter in self._limiters.values()
        )
