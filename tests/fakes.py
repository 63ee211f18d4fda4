"""Stand-ins for what mediatag cannot reach in tests: the upstream analysis API.

``ScriptedAnalyzer`` plays an upstream AI API: it really analyses with the local analyser,
records every call it receives (after the rate limiter let it through), and fails the way
a script says, so retries, quotas and outages can be provoked on purpose.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from analysis_service.analyzers.base import (
    AnalysisInput,
    AnalysisOutput,
    ApiLimit,
    RateLimiter,
)
from analysis_service.analyzers.local import LocalAnalyzer


@dataclass
class Call:
    media_id: str
    sha256: str
    at: float


class _RecordingLimiter:
    def __init__(self, limiter: RateLimiter, on_call: Callable[[], None]) -> None:
        self._limiter = limiter
        self._on_call = on_call

    async def acquire(self, api: str) -> None:
        await self._limiter.acquire(api)
        self._on_call()


@dataclass
class ScriptedAnalyzer:
    """The local analyser behind a scriptable upstream API.

    ``failures[sha256]`` lists exceptions raised by successive calls for that content
    (then it succeeds); ``fail_always`` maps sha256 to an exception raised on every call.
    ``delay`` holds each call that long (to catch jobs mid-flight); while ``gate`` is clear,
    calls wait for it (jobs stay mid-flight until the test lets them go).
    """

    dimensions: int = 1408
    failures: dict[str, list[Exception]] = field(default_factory=dict)
    fail_always: dict[str, Exception] = field(default_factory=dict)
    delay: float = 0.0
    gate: asyncio.Event | None = None
    limits: Sequence[ApiLimit] | None = None
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._inner = LocalAnalyzer(embedding_dimensions=self.dimensions)

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def version(self) -> str:
        return self._inner.version

    @property
    def api_limits(self) -> Sequence[ApiLimit]:
        return self.limits if self.limits is not None else self._inner.api_limits

    def cache_inputs(self, category: str, context: Mapping[str, str]) -> Mapping[str, str]:
        return self._inner.cache_inputs(category, context)

    async def analyze(self, item: AnalysisInput, limiter: RateLimiter) -> AnalysisOutput:
        def record() -> None:
            self.calls.append(Call(item.media_id, item.sha256, time.monotonic()))

        recording = _RecordingLimiter(limiter, record)
        if item.sha256 in self.fail_always or self.failures.get(item.sha256):
            await recording.acquire(self.api_limits[0].api)
            if item.sha256 in self.fail_always:
                raise self.fail_always[item.sha256]
            raise self.failures[item.sha256].pop(0)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        return await self._inner.analyze(item, recording)

    def calls_for(self, sha256: str) -> int:
        return sum(1 for call in self.calls if call.sha256 == sha256)
