"""Rate limits: the GCRA rule on a fake clock, quota backoff in one process, and one limit per
API for replicas sharing a PostgreSQL (real databases, one ``Database`` per replica)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping

import pytest

from analysis_service.analyzers.base import ApiLimit
from analysis_service.domain.clock import RemoteClock
from analysis_service.domain.limits import (
    QUOTA_BACKOFF_INITIAL,
    QUOTA_PAUSE_MAX,
    Gcra,
    RateLimits,
    SharedReading,
    Slot,
    calls_in_window,
)
from analysis_service.errors import StorageUnavailable
from analysis_service.storage.rate_limits import DatabaseSlots
from analysis_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from mediatag_common.database import Database
from tests.conftest import free_port
from tests.queue_support import LoopClock


def reserve(rule: Gcra, tat: float, now: float) -> tuple[float, float]:
    """The slot of a call asking at ``now``, and the new TAT (as the storage applies it)."""
    advanced = rule.advance(tat, now, max)
    return rule.slot(advanced, now, max), advanced


def busiest_window(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` that any closed window of ``window`` seconds holds."""
    ordered = sorted(times)
    most, end = 0, 0
    for start, first in enumerate(ordered):
        while end < len(ordered) and ordered[end] <= first + window:
            end += 1
        most = max(most, end - start)
    return most


# ---- the rule, on a fake clock ----


def test_a_burst_goes_at_once_then_one_call_per_interval() -> None:
    rule = Gcra(rate_per_second=2.0, burst=3)
    tat: float = 0.0
    slots = []
    for _ in range(6):
        at, tat = reserve(rule, tat, 100.0)
        slots.append(at)
    assert slots == [100.0, 100.0, 100.0, 100.5, 101.0, 101.5]
    # Idle long enough, the whole burst is there again.
    at, tat = reserve(rule, tat, 200.0)
    assert at == 200.0


def test_no_window_ever_holds_more_than_rate_plus_burst(seed: int) -> None:
    """Random callers, some asking with a stale clock (a reservation that waited for the
    row's lock): every window of 1 s holds at most R + B calls, and a saturated limit is
    used to the full."""
    rng = random.Random(seed)
    for _ in range(50):
        rule = Gcra(rate_per_second=rng.uniform(0.5, 40.0), burst=rng.randint(1, 8))
        tat: float = 0.0
        clock = 1000.0
        slots = []
        for _ in range(400):
            clock += rng.expovariate(rule.rate_per_second * rng.choice((0.5, 2.0, 8.0)))
            asked = clock - rng.choice((0.0, 0.0, rng.uniform(0.0, 0.3)))
            at, tat = reserve(rule, tat, asked)
            assert at >= asked
            slots.append(at)
        assert busiest_window(slots) <= math.floor(rule.rate_per_second + rule.burst), rule
    # Everyone asking at once: exactly the burst, then the rate.
    rule = Gcra(rate_per_second=10.0, burst=4)
    tat, slots = 0.0, []
    for _ in range(100):
        at, tat = reserve(rule, tat, 0.0)
        slots.append(at)
    assert busiest_window(slots) == 14


def test_a_pause_lets_nothing_through_before_it_ends_and_no_burst_after() -> None:
    rule = Gcra(rate_per_second=4.0, burst=5)
    tat = rule.pause(0.0, 50.0, max)
    slots = []
    for _ in range(4):
        at, tat = reserve(rule, tat, 10.0)
        slots.append(at)
    assert slots == [50.0, 50.25, 50.5, 50.75]


def test_in_use_counts_the_calls_of_the_last_window() -> None:
    reading = SharedReading(
        paused_until=0.0,
        quota_errors=0,
        window_start=100.0,
        window_calls=6,
        previous_window_calls=8,
    )
    # A quarter into the window: all its own calls and three quarters of the one before.
    assert calls_in_window(reading, 102.5, window=10.0) == 6 + 8 * 0.75
    # The next window: the counted one is now the previous one.
    assert calls_in_window(reading, 115.0, window=10.0) == 6 * 0.5
    assert calls_in_window(reading, 130.0, window=10.0) == 0


# ---- one process (SQLite's case): quota pauses ----


@pytest.mark.looptime
async def test_quota_errors_pause_an_api_longer_each_round_until_a_call_goes_through() -> None:
    limits = RateLimits([ApiLimit("vision", 100.0, 1)], {}, clock=LoopClock())
    # The refusals of the calls on their way when the first came: one round, one pause.
    for _ in range(4):
        assert await limits.quota_exceeded("vision", None) == QUOTA_BACKOFF_INITIAL
    # Refused again after the pause: twice as long.
    await asyncio.sleep(QUOTA_BACKOFF_INITIAL)
    assert await limits.quota_exceeded("vision", None) == 2 * QUOTA_BACKOFF_INITIAL
    await asyncio.sleep(2 * QUOTA_BACKOFF_INITIAL)
    limits.succeeded(["vision"])
    assert await limits.quota_exceeded("vision", None) == QUOTA_BACKOFF_INITIAL
    # The API's own retry delay wins, up to a bound.
    assert await limits.quota_exceeded("vision", 7.0) == 7.0
    assert await limits.quota_exceeded("vision", 10 * QUOTA_PAUSE_MAX) == QUOTA_PAUSE_MAX
    (state,) = await limits.snapshot()
    assert state.quota_errors == 8
    assert state.throttled_until is not None
    waiting = asyncio.create_task(limits.acquire("vision"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


@pytest.mark.looptime
async def test_a_pause_holds_for_calls_already_waiting_for_their_slots() -> None:
    limits = RateLimits([ApiLimit("vision", 1.0, 1)], {}, clock=LoopClock())
    loop = asyncio.get_running_loop()
    await limits.acquire("vision")
    # The next slot comes in 1 s; a quota error pauses the API for 10 s meanwhile.
    waiting = asyncio.create_task(limits.acquire("vision"))
    await asyncio.sleep(0.5)
    paused_at = loop.time()
    await limits.quota_exceeded("vision", 10.0)
    await waiting
    assert loop.time() >= paused_at + 10.0


# ---- the shared gate, on a fake clock ----


class LateSlots:
    """GCRA slots as the database grants them (on the loop's clock), each answer arriving
    ``delays[n]`` seconds after it was granted (a slow round trip)."""

    def __init__(self, delays: list[float]) -> None:
        self._delays = iter(delays)
        self._tat = 0.0

    async def reserve(self, api: str, rule: Gcra, window: float) -> Slot:
        now = asyncio.get_running_loop().time()
        at, self._tat = reserve(rule, self._tat, now)
        await asyncio.sleep(next(self._delays))
        return Slot(at=at, now=now)

    async def pause(self, api: str, rule: Gcra, seconds: float) -> None:
        raise NotImplementedError

    async def read(self) -> tuple[Mapping[str, SharedReading], float]:
        raise NotImplementedError

    async def pause_end(self, api: str) -> tuple[float, float]:
        return 0.0, asyncio.get_running_loop().time()


async def _calls_made(limits: RateLimits, workers: int) -> list[float]:
    """When each of ``workers`` workers, starting together, got to call (loop clock)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    made: list[float] = []

    async def call() -> None:
        await limits.acquire("vision")
        made.append(loop.time() - start)

    await asyncio.gather(*(call() for _ in range(workers)))
    return sorted(made)


@pytest.mark.looptime
async def test_a_slow_answer_does_not_make_its_call_late() -> None:
    # Four workers at 4/s, burst 1: slots 0, 0.25, 0.5, 0.75; the answers take 0, 0.1, 0.2
    # and 0.05 s. Waiting each slot's wait from its answer would call at 0.35, 0.7 and 0.8:
    # a late call and another replica's next one, on time, would go too close together.
    slots = LateSlots([0.0, 0.1, 0.2, 0.05])
    limits = RateLimits([ApiLimit("vision", 4.0, 1)], {}, slots, clock=LoopClock())
    assert await _calls_made(limits, 4) == pytest.approx([0.0, 0.25, 0.5, 0.75], abs=1e-3)


@pytest.mark.looptime
async def test_a_call_that_would_go_an_interval_after_its_slot_takes_another() -> None:
    # Slots 0, 0.25, 0.5, 0.75 (4/s, burst 1) answered after 0.9, 0.6, 0.2 and 0 s: the first
    # two came after their slots (by 0.9 and 0.35 s), so they give them up and take the next
    # ones, 1.0 and 1.25 (answered at once). Calling at 0.6 and 0.9 instead would put five
    # calls in the window from 0.5 to 1.5 with the next slots' (the limit allows one more
    # than the rate: R + B = 5, and the calls here keep even spacing).
    slots = LateSlots([0.9, 0.6, 0.2, 0.0, 0.0, 0.0])
    limits = RateLimits([ApiLimit("vision", 4.0, 1)], {}, slots, clock=LoopClock())
    assert await _calls_made(limits, 4) == pytest.approx([0.5, 0.75, 1.0, 1.25], abs=1e-3)


@pytest.mark.looptime
async def test_a_call_half_an_interval_late_leaves_its_slot_for_its_way_to_the_api() -> None:
    # 4/s, slots 0.25 s apart. The first answer is quick (the clock is followed from it). The
    # second call's slot, 0.25, is answered at 0.4: 0.15 s late, over half an interval, and
    # going then could reach the API too close to the next slot's call, so it takes that
    # slot, 0.5, and goes on time. The third's slot, 0.75, answered 0.1 s late, goes.
    slots = LateSlots([0.0, 0.4, 0.0, 0.35])
    limits = RateLimits([ApiLimit("vision", 4.0, 1)], {}, slots, clock=LoopClock())
    assert await _calls_made(limits, 1) == pytest.approx([0.0], abs=1e-3)
    assert await _calls_made(limits, 1) == pytest.approx([0.5], abs=1e-3)
    assert await _calls_made(limits, 1) == pytest.approx([0.35], abs=1e-3)


@pytest.mark.looptime
async def test_a_call_gives_up_at_most_two_slots_then_goes_late() -> None:
    # Every answer but the first comes 0.6 s after its slot (4/s): the call after the first
    # gives up two slots and goes with its third, late, rather than never.
    slots = LateSlots([0.0, 0.6, 0.6, 0.6, 0.6])
    limits = RateLimits([ApiLimit("vision", 4.0, 1)], {}, slots, clock=LoopClock())
    assert await _calls_made(limits, 1) == pytest.approx([0.0], abs=1e-3)
    assert await _calls_made(limits, 1) == pytest.approx([1.8], abs=1e-3)


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def test_the_database_clock_is_followed_by_its_quickest_recent_answer() -> None:
    ours = ManualClock()
    database = RemoteClock(ours, samples=2)
    # Read at 2.0 on the database's clock, received at 100.0 on ours: 3 s until 5.0.
    database.observe(read_at=2.0)
    assert database.until(5.0) == pytest.approx(3.0)
    # An answer 0.2 s slower: the wait is to the same instant, not 0.2 s later.
    ours.now = 100.5
    database.observe(read_at=2.3)
    assert database.until(5.0) == pytest.approx(2.5)
    # The database's clock was set back a second: the estimate follows it once the answers
    # before the change are out of the window (two answers here).
    ours.now = 101.0
    database.observe(read_at=2.0)
    assert database.until(5.0) == pytest.approx(2.2)
    ours.now = 101.1
    database.observe(read_at=2.1)
    assert database.until(5.0) == pytest.approx(2.9)


# ---- replicas sharing PostgreSQL ----


async def _replicas(url: str, count: int) -> list[Database]:
    databases = [Database(url) for _ in range(count)]
    await databases[0].migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    return databases


async def test_replicas_hammering_one_api_keep_to_one_limit(postgres_url: str) -> None:
    """Three replicas with four workers each: the slots the database grants (counted on its
    clock, as each reservation returns them) never hold more than R + B in a second, and
    the limit is used."""
    rate, burst = 20.0, 3
    rule = Gcra(rate, burst)
    databases = await _replicas(postgres_url, 3)
    granted: list[float] = []

    async def worker(slots: DatabaseSlots) -> None:
        while len(granted) < 60:
            slot = await slots.reserve("vision", rule, 10.0)
            granted.append(slot.at)
            await asyncio.sleep(max(0.0, slot.at - slot.now))

    try:
        replicas = [DatabaseSlots(db) for db in databases]
        # A fresh API: a burst at once, then the next call an interval after the first.
        slow = Gcra(rate_per_second=0.1, burst=burst)
        first = [await replicas[n % 3].reserve("gemini", slow, 10.0) for n in range(burst + 1)]
        assert [slot.at - slot.now for slot in first[:burst]] == [0.0] * burst
        assert first[burst].at == pytest.approx(first[0].now + 10.0)
        await asyncio.gather(*(worker(slots) for slots in replicas for _ in range(4)))
        readings, _ = await replicas[1].read()
    finally:
        for db in databases:
            await db.close()
    assert busiest_window(granted) <= rate + burst
    assert busiest_window(granted) >= rate
    assert readings["vision"].window_calls + readings["vision"].previous_window_calls == len(
        granted
    )


async def test_a_quota_pause_set_by_one_replica_holds_for_every_replica(
    postgres_url: str,
) -> None:
    first, second = await _replicas(postgres_url, 2)
    defaults = [ApiLimit("vision", 50.0, 5)]
    try:
        pausing = RateLimits(defaults, {}, DatabaseSlots(first))
        other_slots = DatabaseSlots(second)
        other = RateLimits(defaults, {}, other_slots)
        assert await pausing.quota_exceeded("vision", 1.0) == 1.0
        (state,) = await other.snapshot()
        assert state.quota_errors == 1
        assert state.throttled_until is not None
        # The other replica's next call waits for the pause's end, on the database's clock.
        await other.acquire("vision")
        _, now = await other_slots.read()
        assert now >= state.throttled_until
        # A worker waiting for a slot can be cancelled (a drain does).
        await pausing.quota_exceeded("vision", 60.0)
        waiting = asyncio.create_task(other.acquire("vision"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        await first.close()
        await second.close()


async def test_a_pause_holds_for_calls_another_replica_has_waiting_for_their_slots(
    postgres_url: str,
) -> None:
    first, second = await _replicas(postgres_url, 2)
    defaults = [ApiLimit("vision", 2.0, 1)]
    pausing = RateLimits(defaults, {}, DatabaseSlots(first))
    other_slots = DatabaseSlots(second)
    other = RateLimits(defaults, {}, other_slots)
    # When each of the other replica's calls went, on the database's clock.
    went: list[float] = []

    async def call() -> None:
        await other.acquire("vision")
        went.append((await other_slots.pause_end("vision"))[1])

    try:
        await call()
        # Three more wait for slots 0.5 s apart; the first replica meets a quota error.
        waiting = [asyncio.create_task(call()) for _ in range(3)]
        await pausing.quota_exceeded("vision", 3.0)
        paused_until, paused_at = await other_slots.pause_end("vision")
        await asyncio.gather(*waiting)
    finally:
        await first.close()
        await second.close()
    during = [t for t in went[1:] if t > paused_at]
    assert len(during) >= 2, f"the pause came too late to test anything: {went}, {paused_at}"
    assert min(during) >= paused_until


async def test_no_call_goes_when_the_database_is_unreachable() -> None:
    db = Database(f"postgresql://mediatag@127.0.0.1:{free_port()}/nowhere")
    try:
        limits = RateLimits([ApiLimit("vision", 50.0, 5)], {}, DatabaseSlots(db))
        with pytest.raises(StorageUnavailable):
            await limits.acquire("vision")
    finally:
        await db.close()
