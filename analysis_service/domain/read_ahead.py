"""Reading ahead: what a job claimed ahead needs, asked for before a worker starts it.

A worker that starts a job asks the result cache for its key and reads its bytes, two round
trips that take longer than a zero-latency analysis: with jobs of milliseconds, the workers
would spend most of their time waiting for them. The queue claims jobs ahead only when the
workers start them that fast (see :mod:`analysis_service.domain.queue`), and tells this
module of each: their look-ups go at once (gathered with the others), and their bytes are
read while at most ``max_bytes`` are held so. The worker that starts such a job finds both
under way or done. A job given back unstarted lets go of what was read for it, its claim
on the key too (see :meth:`ResultCache.forget_ahead`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from analysis_service.domain.cache import ResultCache
from analysis_service.domain.content import ContentSource, fetch_content
from analysis_service.domain.models import ClaimedJob, JobSpec

# Bytes read for jobs claimed ahead and not yet started, at most (the jobs started hold
# theirs on top: one item per worker). Images are read ahead while they fit.
READ_AHEAD_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class _Prepared:
    key: str
    # None when the bytes did not fit in READ_AHEAD_BYTES: the worker reads them.
    reading: asyncio.Task[bytes] | None


class ReadAhead:
    """Cache look-ups and reads for the jobs claimed ahead; told of them by the queue."""

    def __init__(
        self,
        cache: ResultCache,
        content: ContentSource,
        key_of: Callable[[JobSpec], str],
        *,
        max_bytes: int = READ_AHEAD_BYTES,
    ) -> None:
        self._cache = cache
        self._content = content
        self._key_of = key_of
        self._max_bytes = max_bytes
        # By (media id, lease token): the same job claimed again is another claim.
        self._prepared: dict[tuple[str, int], _Prepared] = {}
        self.bytes_held = 0

    def claimed_ahead(self, job: ClaimedJob) -> None:
        """Start ``job``'s look-up, and its read if its bytes fit."""
        key = self._key_of(job.spec)
        self._cache.look_up_ahead(key)
        reading = None
        if self.bytes_held + job.spec.size_bytes <= self._max_bytes:
            reading = self._read(job.spec)
            self.bytes_held += job.spec.size_bytes
        self._prepared[_claim_of(job)] = _Prepared(key, reading)

    async def given_back(self, jobs: Sequence[ClaimedJob]) -> None:
        """``jobs`` go back unstarted: their reads are cancelled, their look-ups let go."""
        keys = []
        for job in jobs:
            prepared = self._take(job)
            if prepared is None:
                continue
            if prepared.reading is not None:
                prepared.reading.cancel()
            keys.append(prepared.key)
        await asyncio.gather(*(self._cache.forget_ahead(key) for key in keys))

    def start(self, job: ClaimedJob) -> tuple[str, asyncio.Task[bytes]]:
        """A worker starts ``job``: its cache key and the read of its bytes (read ahead, or
        begun now). The read's failure is the job's only if the job awaits it."""
        prepared = self._take(job)
        if prepared is None:
            return self._key_of(job.spec), self._read(job.spec)
        return prepared.key, prepared.reading or self._read(job.spec)

    def _take(self, job: ClaimedJob) -> _Prepared | None:
        prepared = self._prepared.pop(_claim_of(job), None)
        if prepared is not None and prepared.reading is not None:
            self.bytes_held -= job.spec.size_bytes
        return prepared

    def _read(self, spec: JobSpec) -> asyncio.Task[bytes]:
        reading = asyncio.create_task(fetch_content(self._content, spec), name="read")
        reading.add_done_callback(_retrieved)
        return reading


def _claim_of(job: ClaimedJob) -> tuple[str, int]:
    return job.spec.media_id, job.lease_token


def _retrieved(reading: asyncio.Task[bytes]) -> None:
    """A read's failure is the job's only when the job analyses (awaits) it."""
    if not reading.cancelled():
        reading.exception()
