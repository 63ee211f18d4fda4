"""The result cache of :class:`~analysis_service.storage.memory_store.MemoryQueueStore`:
results by key, and which holder is analysing a key (as ``results`` and ``result_claims``
do in SQL)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from analysis_service.domain.models import JobResult


@dataclass(frozen=True)
class _Claim:
    holder: str
    expires_at: float


class MemoryResults:
    """Cached results, each kept once, and the live claims on keys."""

    def __init__(self) -> None:
        self._results: dict[str, JobResult] = {}
        self._claims: dict[str, _Claim] = {}

    def get(self, key: str | None, *, reused: bool, with_embedding: bool) -> JobResult | None:
        """The result stored under ``key`` as a job or an event shows it (None if absent)."""
        result = self._results.get(key) if key is not None else None
        if result is None:
            return None
        embedding = result.embedding if with_embedding else None
        return replace(result, reused=reused, embedding=embedding)

    def store(self, key: str, result: JobResult, holder: str | None) -> None:
        """Keep ``result`` unless the key is already cached (results are deterministic by
        key), and end ``holder``'s claim on it."""
        if result.embedding is None:
            raise ValueError("a stored result needs its embedding")
        self._results.setdefault(key, result)
        if holder is not None:
            self.drop(key, holder)

    def take(self, key: str, holder: str, *, now: float, lease_seconds: float) -> JobResult | bool:
        """The result stored under ``key``; else claim its analysis (True) unless another
        holder's claim is still live (False)."""
        stored = self.get(key, reused=True, with_embedding=True)
        if stored is not None:
            return stored
        claim = self._claims.get(key)
        if claim is not None and claim.holder != holder and claim.expires_at >= now:
            return False
        self._claims[key] = _Claim(holder, now + lease_seconds)
        return True

    def drop_expired(self, now: float) -> None:
        """Forget the claims expired at ``now`` (their holders stopped without ending them)."""
        self._claims = {
            key: claim for key, claim in self._claims.items() if claim.expires_at >= now
        }

    def drop(self, key: str, holder: str) -> None:
        claim = self._claims.get(key)
        if claim is not None and claim.holder == holder:
            del self._claims[key]
