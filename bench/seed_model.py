"""The seed's design as a small in-memory model, to run against the same simulated API.

The seed note's ``MediaProcessorService`` keeps an in-memory list; enqueuing starts its one
worker if it is idle; the worker takes jobs in order, calls the analyser, and waits
``RATE_LIMIT_DELAY_MS`` (500 ms) before the next call. Nothing is persisted. Its retry path
is left out: the simulated API never fails, so it would never run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from analysis_service.analyzers.base import AnalysisInput, Analyzer

# RATE_LIMIT_DELAY_MS of the seed note.
SEED_PAUSE = 0.5


class BucketLimiter:
    """One API's limit as mediatag's ``RateLimits`` builds it: ``AsyncLimiter(B, B / R)``."""

    def __init__(self, rate_per_second: float, burst: int) -> None:
        self._limiter = AsyncLimiter(burst, burst / rate_per_second)

    async def acquire(self, api: str) -> None:
        await self._limiter.acquire()


class SeedProcessor:
    """One sequential worker over an in-memory list; ``completed_at`` in perf_counter time."""

    def __init__(self, analyzer: Analyzer, limiter: BucketLimiter, pause: float = SEED_PAUSE):
        self._analyzer = analyzer
        self._limiter = limiter
        self._pause = pause
        self._queue: list[str] = []
        self._worker: asyncio.Task[None] | None = None
        self.status: dict[str, str] = {}
        self.completed_at: dict[str, float] = {}

    def enqueue(self, media_id: str) -> None:
        self._queue.append(media_id)
        self.status[media_id] = "pending"
        if self._worker is None:
            self._worker = asyncio.create_task(self._work())

    async def join(self) -> None:
        """Wait until the worker has emptied the list."""
        if self._worker is not None:
            await self._worker

    async def _work(self) -> None:
        try:
            while self._queue:
                media_id = self._queue.pop(0)
                self.status[media_id] = "processing"
                item = AnalysisInput(media_id=media_id, content=b"", content_type="", sha256="")
                await self._analyzer.analyze(item, self._limiter)
                self.status[media_id] = "completed"
                self.completed_at[media_id] = time.perf_counter()
                if self._queue:
                    await asyncio.sleep(self._pause)
        finally:
            self._worker = None


@dataclass(frozen=True)
class SeedRun:
    """The model's run: images, seconds from the first enqueue to the first and last
    completion."""

    images: int
    time_to_first: float
    time_to_last: float

    @property
    def jobs_per_second(self) -> float:
        return self.images / self.time_to_last

    @property
    def sustained_jobs_per_second(self) -> float:
        """Completions per second between the first and the last."""
        return (self.images - 1) / (self.time_to_last - self.time_to_first)


async def run_seed_model(analyzer: Analyzer, limiter: BucketLimiter, images: int) -> SeedRun:
    """Enqueue ``images`` jobs at once (the seed's upload answers before analysis) and run."""
    processor = SeedProcessor(analyzer, limiter)
    started = time.perf_counter()
    for number in range(images):
        processor.enqueue(f"seed-{number}")
    await processor.join()
    if len(processor.completed_at) != images:
        raise RuntimeError(f"seed model completed {len(processor.completed_at)} of {images}")
    done = sorted(processor.completed_at.values())
    return SeedRun(images, done[0] - started, done[-1] - started)


def seed_time_to_last(images: int, latency: float, pause: float = SEED_PAUSE) -> float:
    """The seed's time to its last completion, worked out: one call and one pause per job,
    no pause after the last."""
    return images * latency + (images - 1) * pause
