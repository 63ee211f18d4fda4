"""The rate limits of the analyser's upstream APIs, slowed down by quota errors.

Where the slots are kept is a :class:`RateGate`:

- :class:`InProcessGate` (one process; SQLite): one aiolimiter per API. A limit of R calls/s
  with bursts of B is ``AsyncLimiter(B, B / R)``: the bucket holds B and leaks R per second
  (``AsyncLimiter(R, 1)`` would start full and let 2R calls through in the first second).
- :class:`SharedGate` (replicas on one database): the :class:`Gcra` rule applied to one
  row per API by :class:`SharedSlots` (storage), on the database's clock, so that every
  replica together keeps to the limit and a quota pause holds for all of them.

:class:`RateLimits` keeps the rules that do not depend on where the slots are: which APIs
there are and their limits, and how long a quota error pauses an API.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Self, TypeVar

from aiolimiter import AsyncLimiter

from analysis_service.analyzers.base import ApiLimit
from analysis_service.config import RateLimitConfig
from analysis_service.domain.clock import SYSTEM_CLOCK, Clock, RemoteClock
from analysis_service.domain.models import RateLimitState

logger = logging.getLogger(__name__)

# How long an API pauses after a quota error that names no retry delay; doubles on each
# consecutive quota error (of this replica), and resets after a call goes through.
QUOTA_BACKOFF_INITIAL = 1.0
QUOTA_BACKOFF_MAX = 60.0
# A retry delay named by the API is honoured up to this long: a wait has a bound.
QUOTA_PAUSE_MAX = 3600.0
# "In use" is the share of the limit used over this many seconds.
USE_WINDOW = 10.0
# Slots a shared gate's call gives up in a row, each for having come too late, before it goes
# late rather than never (a machine too busy to call on time still makes progress).
SLOTS_GIVEN_UP_MAX = 2
# The share of an interval a shared gate's call may go after its slot. The window bound holds
# for calls that reach the API less than an interval after their slots; the other half is
# the call's own way there (on a loaded machine, beside two busy processes, calls reached a
# simulated API up to 70 ms apart from their slots' spacing).
LATENESS_ALLOWED = 0.5


class Instant(Protocol):
    """A point in time the GCRA rule can compute with: a float, or a SQL expression."""

    def __add__(self, seconds: float, /) -> Self: ...

    def __sub__(self, seconds: float, /) -> Self: ...


When = TypeVar("When", bound=Instant)


@dataclass(frozen=True)
class Gcra:
    """The generic cell rate algorithm: R calls/s with bursts of B, as one number per API.

    The state is the theoretical arrival time (TAT) of the next call. Reserving a call at
    ``now`` moves TAT to ``max(TAT, now) + interval`` (:meth:`advance`); the call may go at
    ``max(TAT - tolerance, now)`` with the TAT before it, which is :meth:`slot` of the TAT
    after it (so an ``UPDATE … RETURNING``, which sees only the new row, can tell it). Any
    window of W seconds then holds at most ``R * W + B`` calls, whatever order the
    reservations come in, and a stale ``now`` (a reservation that waited for the row's
    lock) only makes its call later.

    The methods take a ``latest`` function (``max`` for numbers, ``GREATEST`` for SQL), so
    the storage applies this very rule on the database's clock.
    """

    rate_per_second: float
    burst: int

    @property
    def interval(self) -> float:
        """Seconds between calls at the steady rate."""
        return 1.0 / self.rate_per_second

    @property
    def tolerance(self) -> float:
        """How far ahead of the steady rate a call may go: B - 1 intervals."""
        return (self.burst - 1) * self.interval

    def advance(self, tat: When, now: When, latest: Callable[[When, When], When]) -> When:
        """The TAT once a call asking at ``now`` is reserved."""
        return latest(tat, now) + self.interval

    def slot(self, advanced: When, now: When, latest: Callable[[When, When], When]) -> When:
        """When the call whose reservation moved TAT to ``advanced`` may go."""
        return latest(advanced - (self.interval + self.tolerance), now)

    def pause(self, tat: When, until: When, latest: Callable[[When, When], When]) -> When:
        """The TAT that lets no call go before ``until``, and no burst right after it."""
        return latest(tat, until + self.tolerance)


@dataclass(frozen=True)
class SharedReading:
    """One API's row as the database has it, read at ``now`` (the database's clock)."""

    paused_until: float
    quota_errors: int
    window_start: float
    window_calls: int
    previous_window_calls: int


def calls_in_window(reading: SharedReading, now: float, window: float = USE_WINDOW) -> float:
    """Calls in the ``window`` seconds before ``now``, estimated from the calls counted in
    the current fixed window and the one before it (the older one weighted by how much of
    it the sliding window still covers)."""
    current_start = math.floor(now / window) * window
    if reading.window_start == current_start:
        current, previous = reading.window_calls, reading.previous_window_calls
    elif reading.window_start == current_start - window:
        current, previous = 0, reading.window_calls
    else:
        current, previous = 0, 0
    return current + previous * (1.0 - (now - current_start) / window)


@dataclass(frozen=True)
class Slot:
    """A reserved call: it may go at ``at``; it was reserved at ``now`` (database clock)."""

    at: float
    now: float


class SharedSlots(Protocol):
    """The GCRA rows of every replica's upstream APIs (the storage implements it).

    Each method is one round trip to the database; times are on the database's clock.
    """

    async def reserve(self, api: str, rule: Gcra, window: float) -> Slot:
        """Reserve the next slot of ``api`` under ``rule`` (counting the call in fixed
        windows of ``window`` seconds)."""

    async def pause(self, api: str, rule: Gcra, seconds: float) -> None:
        """Let no call to ``api`` go for ``seconds``, whichever replica asks; count a quota
        error."""

    async def read(self) -> tuple[Mapping[str, SharedReading], float]:
        """Every API's row, and the database's clock."""

    async def pause_end(self, api: str) -> tuple[float, float]:
        """When the pause of ``api`` ends (in the past when it is not paused), and the
        database's clock."""


@dataclass
class UpstreamApi:
    """One upstream API: its limit, and the quota errors this process met."""

    name: str
    config: RateLimitConfig
    quota_errors: int = 0
    consecutive_quota_errors: int = 0
    # When the pause this process's last quota backoff set ends (the clock's monotonic time).
    backoff_until: float = 0.0

    @property
    def rule(self) -> Gcra:
        return Gcra(self.config.rate_per_second, self.config.burst)


class RateGate(Protocol):
    """Where the slots of the upstream APIs' limits are kept."""

    async def acquire(self, api: UpstreamApi) -> None:
        """Return once a call to ``api`` may be made now (cancellable while it waits)."""

    async def pause(self, api: UpstreamApi, seconds: float) -> None:
        """Let no call to ``api`` go for ``seconds``."""

    async def states(self, apis: Sequence[UpstreamApi]) -> tuple[RateLimitState, ...]:
        """The limits at a glance."""


class _LocalLimiter:
    def __init__(self, config: RateLimitConfig) -> None:
        # A leaky bucket of the limit: it holds B and leaks R per second (see the module).
        self.limiter = AsyncLimiter(config.burst, config.burst / config.rate_per_second)
        self.throttled_until = 0.0
        self.recent_calls: collections.deque[float] = collections.deque()


class InProcessGate:
    """The slots in this process: one aiolimiter per API (SQLite, where one process runs)."""

    def __init__(self, apis: Sequence[UpstreamApi], clock: Clock) -> None:
        self._limiters = {api.name: _LocalLimiter(api.config) for api in apis}
        self._clock = clock

    async def acquire(self, api: UpstreamApi) -> None:
        limiter = self._limiters[api.name]
        while True:
            # A quota error may extend the pause while we sleep, hence the loop.
            while (pause := limiter.throttled_until - self._clock.time()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(pause)
            await limiter.limiter.acquire()
            # A pause that began while this call waited for its slot holds for it too.
            if limiter.throttled_until <= self._clock.time():
                break
        now = self._clock.monotonic()
        limiter.recent_calls.append(now)
        while limiter.recent_calls and limiter.recent_calls[0] < now - USE_WINDOW:
            limiter.recent_calls.popleft()

    async def pause(self, api: UpstreamApi, seconds: float) -> None:
        limiter = self._limiters[api.name]
        limiter.throttled_until = max(limiter.throttled_until, self._clock.time() + seconds)

    async def states(self, apis: Sequence[UpstreamApi]) -> tuple[RateLimitState, ...]:
        now, clock = self._clock.time(), self._clock.monotonic()
        states = []
        for api in apis:
            limiter = self._limiters[api.name]
            calls = sum(1 for t in limiter.recent_calls if t >= clock - USE_WINDOW)
            until = limiter.throttled_until
            states.append(_state(api, calls, until if until > now else None, api.quota_errors))
        return tuple(states)


class SharedGate:
    """The slots in the database every replica shares: reserve one slot in one round trip,
    then sleep until it comes (no polling; a cancelled wait leaves its slot unused, which
    errs on the safe side).

    The slots keep to the limit as granted; the calls keep to it as they reach the API as
    long as each reaches it less than one interval after its slot. Any window of W seconds
    then holds at most ``R * W + B`` calls (it holds the calls of slots granted within W plus
    less than one interval), whichever replica makes them. A call goes less than
    :data:`LATENESS_ALLOWED` of an interval after its slot, leaving the rest for its way to
    the API. So:

    - the wait runs to the slot on the database's clock as this replica follows it
      (:class:`RemoteClock`), not from whenever the answer came: a slow answer alone does
      not make its call late;
    - a call that would still go later than that (an answer that came after its slot, an
      event loop too busy to wake on time) gives the slot up and reserves another, at most
      :data:`SLOTS_GIVEN_UP_MAX` times in a row.

    A quota pause holds for calls already waiting for their slots, on every replica: one
    that waited looks again (one round trip) and, if a pause began meanwhile, reserves a
    slot after it. One that did not wait goes (it was on its way when the pause began).
    """

    def __init__(self, slots: SharedSlots, clock: Clock) -> None:
        self._slots = slots
        self._database_clock = RemoteClock(clock)

    async def acquire(self, api: UpstreamApi) -> None:
        given_up = 0
        while True:
            slot = await self._slots.reserve(api.name, api.rule, USE_WINDOW)
            self._database_clock.observe(read_at=slot.now)
            wait = self._database_clock.until(slot.at)
            if wait > 0:
                await asyncio.sleep(wait)
                pause_end, now = await self._slots.pause_end(api.name)
                if pause_end > now:
                    continue
            late = -self._database_clock.until(slot.at)
            if late < api.rule.interval * LATENESS_ALLOWED or given_up == SLOTS_GIVEN_UP_MAX:
                return
            given_up += 1

    async def pause(self, api: UpstreamApi, seconds: float) -> None:
        await self._slots.pause(api.name, api.rule, seconds)

    async def states(self, apis: Sequence[UpstreamApi]) -> tuple[RateLimitState, ...]:
        readings, now = await self._slots.read()
        states = []
        for api in apis:
            reading = readings.get(api.name)
            if reading is None:
                states.append(_state(api, 0, None, 0))
                continue
            until = reading.paused_until if reading.paused_until > now else None
            calls = calls_in_window(reading, now)
            states.append(_state(api, calls, until, reading.quota_errors))
        return tuple(states)


def _state(
    api: UpstreamApi, calls: float, throttled_until: float | None, quota_errors: int
) -> RateLimitState:
    return RateLimitState(
        api=api.name,
        rate_per_second=api.config.rate_per_second,
        burst=api.config.burst,
        current_use=min(1.0, calls / (api.config.rate_per_second * USE_WINDOW)),
        throttled_until=throttled_until,
        quota_errors=quota_errors,
    )


class RateLimits:
    """The limits of the analyser's upstream APIs; ``acquire(api)`` waits for a slot.

    The slots are this process's own (on ``clock``) unless ``shared`` keeps them for every
    replica (on the database's clock).
    """

    def __init__(
        self,
        defaults: Sequence[ApiLimit],
        overrides: Mapping[str, RateLimitConfig],
        shared: SharedSlots | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        configs = {d.api: RateLimitConfig(d.rate_per_second, d.burst) for d in defaults}
        unused = sorted(set(overrides) - set(configs))
        if unused:
            # Another analyser's (the config refuses names no analyser calls): one environment
            # file may hold every analyser's limits, for replicas that run different ones.
            logger.warning(
                "ignoring the rate limit of %s: this analyser, as configured, calls only %s",
                ", ".join(unused),
                ", ".join(sorted(configs)),
            )
        configs.update((api, limit) for api, limit in overrides.items() if api in configs)
        for api, config in configs.items():
            if config.rate_per_second <= 0 or config.burst < 1:
                raise ValueError(f"rate limit of {api} must be > 0 with burst >= 1")
        self._apis = {api: UpstreamApi(api, config) for api, config in configs.items()}
        apis = list(self._apis.values())
        self._gate: RateGate = (
            InProcessGate(apis, clock) if shared is None else SharedGate(shared, clock)
        )
        self._clock = clock

    def _api(self, api: str) -> UpstreamApi:
        try:
            return self._apis[api]
        except KeyError:
            raise ValueError(f"no rate limit configured for API {api!r}") from None

    @property
    def configured(self) -> Mapping[str, RateLimitConfig]:
        """Each API's limit."""
        return {name: api.config for name, api in self._apis.items()}

    async def acquire(self, api: str) -> None:
        """Wait for a slot of ``api``; raises StorageUnavailable when the slots are kept in a
        database that cannot be reached (no call goes without a slot)."""
        await self._gate.acquire(self._api(api))

    def succeeded(self, apis: Sequence[str]) -> None:
        """Calls went through: quota backoff starts again from its initial value."""
        for api in apis:
            self._api(api).consecutive_quota_errors = 0

    async def quota_exceeded(self, api: str, retry_after: float | None) -> float:
        """Pause ``api`` after a quota error; returns how long it is paused."""
        limit = self._api(api)
        limit.quota_errors += 1
        now = self._clock.monotonic()
        # The refusals of calls that were on their way when the first came are one round
        # with it: only a refusal after the pause it set makes the next pause longer (16
        # workers refused at once paused the API for a minute, not a second).
        if now >= limit.backoff_until:
            limit.consecutive_quota_errors += 1
        pause = retry_after
        if pause is None:
            exponent = limit.consecutive_quota_errors - 1
            pause = min(QUOTA_BACKOFF_MAX, QUOTA_BACKOFF_INITIAL * 2.0**exponent)
        pause = min(pause, QUOTA_PAUSE_MAX)
        limit.backoff_until = max(limit.backoff_until, now + pause)
        logger.warning("quota exceeded on %s: pausing it for %.1f s", api, pause)
        await self._gate.pause(limit, pause)
        return pause

    def quota_error_counts(self) -> dict[str, int]:
        """Quota errors this process met, by API; plain reads, safe from a metrics scrape's
        thread (each replica exports its own; the status shows the cluster's)."""
        return {name: api.quota_errors for name, api in self._apis.items()}

    def min_rate(self) -> float:
        """The lowest configured rate: an upper bound on jobs per second (infinite for an
        analyser that calls no limited API)."""
        return min((api.config.rate_per_second for api in self._apis.values()), default=math.inf)

    async def snapshot(self) -> tuple[RateLimitState, ...]:
        """Each API's limit, use, pause and quota errors (of every replica when shared)."""
        return await self._gate.states(list(self._apis.values()))
