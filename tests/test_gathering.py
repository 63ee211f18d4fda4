"""Gathering's rules: requests of one moment share a call, requests during a call wait for
the next (or go at once while fewer than ``max_calls`` are under way), a call's failure is
each of its requests', a request cancelled before its call is not asked."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from analysis_service.domain.gathering import Gathering


class Upstream:
    """Answers each request doubled; each call waits for ``release`` when ``hold`` is set."""

    def __init__(self, *, hold: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        # What each call raises, in order (None: it answers).
        self.failures: list[Exception | None] = []
        self._called = asyncio.Condition()

    async def call(self, requests: Sequence[int]) -> list[int]:
        async with self._called:
            self.calls.append(list(requests))
            self._called.notify_all()
        await self.release.wait()
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        return [request * 2 for request in requests]

    async def called(self, times: int) -> None:
        async with self._called:
            await self._called.wait_for(lambda: len(self.calls) >= times)


async def _called(upstream: Upstream, times: int) -> None:
    await asyncio.wait_for(upstream.called(times), 5)


async def test_requests_of_one_moment_share_one_call() -> None:
    upstream = Upstream()
    gathering = Gathering(upstream.call, max_batch=10)
    answers = await asyncio.gather(*(gathering.ask(n) for n in range(4)))
    assert answers == [0, 2, 4, 6]
    assert upstream.calls == [[0, 1, 2, 3]]


async def test_requests_during_a_call_wait_for_the_next_which_takes_them_all() -> None:
    upstream = Upstream(hold=True)
    gathering = Gathering(upstream.call, max_batch=10)
    first = asyncio.create_task(gathering.ask(1))
    await _called(upstream, 1)
    later = [asyncio.create_task(gathering.ask(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    assert upstream.calls == [[1]]
    upstream.release.set()
    assert list(await asyncio.wait_for(asyncio.gather(first, *later), 5)) == [2, 4, 6, 8]
    assert upstream.calls == [[1], [2, 3, 4]]


async def test_with_two_calls_allowed_a_request_during_one_goes_at_once_and_a_third_waits() -> None:
    upstream = Upstream(hold=True)
    gathering = Gathering(upstream.call, max_batch=10, max_calls=2)
    first = asyncio.create_task(gathering.ask(1))
    await _called(upstream, 1)
    second = asyncio.create_task(gathering.ask(2))
    await _called(upstream, 2)
    third = [asyncio.create_task(gathering.ask(n)) for n in (3, 4)]
    await asyncio.sleep(0)
    assert upstream.calls == [[1], [2]]
    upstream.release.set()
    answers = await asyncio.wait_for(asyncio.gather(first, second, *third), 5)
    assert list(answers) == [2, 4, 6, 8]
    assert upstream.calls == [[1], [2], [3, 4]]


async def test_a_call_carries_at_most_max_batch_requests() -> None:
    upstream = Upstream()
    gathering = Gathering(upstream.call, max_batch=3)
    answers = await asyncio.gather(*(gathering.ask(n) for n in range(7)))
    assert answers == [n * 2 for n in range(7)]
    assert upstream.calls == [[0, 1, 2], [3, 4, 5], [6]]


async def test_a_failed_call_fails_each_of_its_requests_and_the_next_call_goes() -> None:
    upstream = Upstream(hold=True)
    upstream.failures = [ConnectionError("down")]
    gathering = Gathering(upstream.call, max_batch=10)
    failing = [asyncio.create_task(gathering.ask(n)) for n in (1, 2)]
    await _called(upstream, 1)
    after = asyncio.create_task(gathering.ask(3))
    await asyncio.sleep(0)
    upstream.release.set()
    for task in failing:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(task, 5)
    assert await asyncio.wait_for(after, 5) == 6
    assert upstream.calls == [[1, 2], [3]]


async def test_a_request_cancelled_before_its_call_is_not_asked() -> None:
    upstream = Upstream(hold=True)
    gathering = Gathering(upstream.call, max_batch=10)
    first = asyncio.create_task(gathering.ask(1))
    await _called(upstream, 1)
    dropped = asyncio.create_task(gathering.ask(2))
    kept = asyncio.create_task(gathering.ask(3))
    await asyncio.sleep(0)
    dropped.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dropped
    upstream.release.set()
    assert list(await asyncio.wait_for(asyncio.gather(first, kept), 5)) == [2, 6]
    assert upstream.calls == [[1], [3]]


async def test_close_cancels_the_call_under_way_and_the_requests_waiting() -> None:
    upstream = Upstream(hold=True)
    gathering = Gathering(upstream.call, max_batch=10)
    under_way = asyncio.create_task(gathering.ask(1))
    await _called(upstream, 1)
    waiting = asyncio.create_task(gathering.ask(2))
    await asyncio.sleep(0)
    await asyncio.wait_for(gathering.close(), 5)
    for task in (under_way, waiting):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    assert upstream.calls == [[1]]


def test_a_call_carries_at_least_one_request_and_one_call_may_go() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Gathering(Upstream().call, max_batch=0)
    with pytest.raises(ValueError, match="one call may go"):
        Gathering(Upstream().call, max_batch=1, max_calls=0)
