"""The interface every analyser implements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ApiLimit:
    """Default rate limit of one upstream API an analyser calls."""

    api: str
    rate_per_second: float
    burst: int = 1


@dataclass(frozen=True)
class AnalysisInput:
    """One image to analyse, with what the uploader said about it."""

    media_id: str
    content: bytes
    content_type: str
    sha256: str
    category: str = ""
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AnalysisOutput:
    """Tags (ordered, lower-case, hyphenated) and an L2-normalised float32 embedding.

    ``degraded``: made by the analyser's fallback because an upstream answer could not be
    used (Gemini's refinement, say). The job completes with it, but it is not cached: the
    next job with the same content analyses it again.
    """

    tags: tuple[str, ...]
    embedding: npt.NDArray[np.float32]
    degraded: bool = False


class RateLimiter(Protocol):
    """Waits for a slot of one upstream API's rate limit."""

    async def acquire(self, api: str) -> None:
        """Return once a call to ``api`` may be made now."""


class Analyzer(Protocol):
    """An image analyser.

    ``analyze`` calls ``limiter.acquire(api)`` right before each upstream call, its request
    ready (an image re-encoded before the slot, not after: a call that leaves late bunches up
    with the next ones past the limit). It raises ``TransientAnalyzerError``,
    ``PermanentAnalyzerError`` or ``QuotaExceeded`` (from ``analysis_service.errors``) on
    failure; nothing else.
    """

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str:
        """Changes whenever the output for the same input may change (part of the cache key)."""

    @property
    def api_limits(self) -> Sequence[ApiLimit]:
        """Default limits of the upstream APIs this analyser calls."""

    def cache_inputs(self, category: str, context: Mapping[str, str]) -> Mapping[str, str]:
        """The inputs besides the bytes that change the result (part of the cache key).

        Called before the content is fetched, so a cached result needs no fetch at all.
        """

    async def analyze(self, item: AnalysisInput, limiter: RateLimiter) -> AnalysisOutput:
        """Analyse one image."""
