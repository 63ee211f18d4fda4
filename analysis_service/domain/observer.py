"""What the analysis domain reports as it works, for whoever measures it.

The workers call an :class:`AnalysisObserver` as attempts and analyser calls end; the
service's metrics implement it, and :class:`NoObserver` ignores everything (tests, or the
domain embedded without metrics). Numbers the domain keeps anyway (busy workers, watchers,
cache hits) are not reported: whoever measures reads them when it needs them.
"""

from __future__ import annotations

import enum
from typing import Protocol

from analysis_service.domain.models import AttemptOutcome


class CallOutcome(enum.Enum):
    """How one analyser call ended: without an error, or the class of its error."""

    OK = enum.auto()
    # AnalyzerFailure that another attempt may get past (unavailable, deadline, 5xx).
    TRANSIENT = enum.auto()
    # AnalyzerFailure that another attempt would meet again (undecodable image).
    PERMANENT = enum.auto()
    # QuotaExceeded: the upstream API refused for quota.
    QUOTA = enum.auto()
    # Anything else: a bug in the analyser or in the service.
    INTERNAL = enum.auto()


class AnalysisObserver(Protocol):
    """Told what the workers did; called on the event loop, and must not block it."""

    def attempt_ended(self, outcome: AttemptOutcome, seconds: float, attempt: int) -> None:
        """Attempt number ``attempt`` ended with ``outcome``, ``seconds`` after its claim."""

    def analyzer_call_ended(self, outcome: CallOutcome, seconds: float, api: str) -> None:
        """An analyser call ended after ``seconds`` (rate-limit waits left out).

        ``api`` is the upstream API the call asked for last (an error belongs to it), or
        ``"none"`` when it asked for none.
        """

    def waited_for_limit(self, api: str, seconds: float) -> None:
        """A call to ``api`` waited ``seconds`` for its rate limiter (quota pauses included)."""


class NoObserver:
    """An :class:`AnalysisObserver` that ignores everything."""

    def attempt_ended(self, outcome: AttemptOutcome, seconds: float, attempt: int) -> None:
        pass

    def analyzer_call_ended(self, outcome: CallOutcome, seconds: float, api: str) -> None:
        pass

    def waited_for_limit(self, api: str, seconds: float) -> None:
        pass
