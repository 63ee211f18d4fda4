"""Closed-loop load: N concurrent callers, each starting its next call when the last ends."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadResult:
    """Per-call latencies and the wall time of one or more runs, in seconds."""

    latencies: Sequence[float]
    elapsed: float

    @property
    def calls_per_second(self) -> float:
        return len(self.latencies) / self.elapsed

    def percentile(self, percent: int) -> float:
        """The ``percent``-th percentile latency (1..99), interpolated between samples."""
        if len(self.latencies) < 2:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[percent - 1]

    def __add__(self, other: LoadResult) -> LoadResult:
        return LoadResult([*self.latencies, *other.latencies], self.elapsed + other.elapsed)


async def run_closed_loop(
    call: Callable[[], Awaitable[float]], *, calls: int, concurrency: int
) -> LoadResult:
    """Make ``calls`` calls from ``concurrency`` callers; ``call`` returns its own latency.

    ``call`` times itself so that preparing a request stays out of the latency but inside
    the wall time. Any failed call fails the run.
    """
    pending = iter(range(calls))
    latencies: list[float] = []

    async def caller() -> None:
        # The callers share one iterator: together they make exactly ``calls`` calls.
        for _ in pending:
            latencies.append(await call())

    started = time.perf_counter()
    async with asyncio.TaskGroup() as callers:
        for _ in range(min(concurrency, calls)):
            callers.create_task(caller())
    return LoadResult(latencies, time.perf_counter() - started)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in at most ``parts`` nearly equal, positive shares."""
    share, extra = divmod(total, parts)
    shares = [share + 1] * extra + [share] * (parts - extra)
    return [count for count in shares if count > 0]
