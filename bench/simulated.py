"""A simulated upstream analysis API: a fixed latency per call under one rate limit, or none.

Under a limit it honours the limiter exactly as ``LocalAnalyzer`` does (one ``acquire`` of
its API before the call); without one it declares no limit and asks for no slot. It then
waits out its latency and answers fixed tags and a small fixed embedding, so a run measures
the queue, the workers and the limiter rather than any image work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import numpy as np

from analysis_service.analyzers.base import AnalysisInput, AnalysisOutput, ApiLimit, RateLimiter

API = "simulated-api"
TAGS = ("simulated", "bench")


class SimulatedAnalyzer:
    """``latency`` seconds per call; ``rate_per_second`` calls/s in bursts of ``burst`` (None:
    an API without a limit)."""

    name = "simulated"
    version = "1"

    def __init__(
        self,
        *,
        latency: float,
        rate_per_second: float | None,
        burst: int = 1,
        dimensions: int = 16,
    ) -> None:
        bad_rate = rate_per_second is not None and rate_per_second <= 0
        if latency < 0 or bad_rate or burst < 1 or dimensions < 1:
            raise ValueError("latency >= 0, rate > 0 (or None), burst >= 1 and dimensions >= 1")
        self.latency = latency
        self.rate_per_second = rate_per_second
        self.burst = burst
        embedding = np.ones(dimensions, dtype=np.float32)
        self._embedding = embedding / np.linalg.norm(embedding)
        # When each call was let through (``time.time()``): counted where it arrives.
        self.calls: list[float] = []

    @property
    def api_limits(self) -> Sequence[ApiLimit]:
        if self.rate_per_second is None:
            return ()
        return (ApiLimit(API, rate_per_second=self.rate_per_second, burst=self.burst),)

    def cache_inputs(self, category: str, context: Mapping[str, str]) -> Mapping[str, str]:
        return {}

    async def analyze(self, item: AnalysisInput, limiter: RateLimiter) -> AnalysisOutput:
        if self.rate_per_second is not None:
            await limiter.acquire(API)
        self.calls.append(time.time())
        if self.latency:
            await asyncio.sleep(self.latency)
        return AnalysisOutput(tags=TAGS, embedding=self._embedding)
