"""Result reuse: a durable cache by content and analyser, with single flight.

The key is (sha256, analyser name + version, every input that changes the result), so a
new analyser version or a different category (for analysers that use it) is a miss.
While a key is being analysed, other jobs with that key wait for that call instead of
making a second one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping

from analysis_service.domain.models import JobResult
from analysis_service.storage import jobs as job_store
from analysis_service.storage.session import read, write
from mediatag_common.database import Database


class ResultCache:
    """Cached results by key; ``get_or_compute`` runs at most one computation per key."""

    def __init__(self, db: Database, *, analyzer_name: str, analyzer_version: str) -> None:
        self._db = db
        self._analyzer_name = analyzer_name
        self._analyzer_version = analyzer_version
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        self.hits = 0
        self.misses = 0

    def key(self, sha256: str, inputs: Mapping[str, str]) -> str:
        canonical = json.dumps(
            {
                "sha256": sha256,
                "analyzer": self._analyzer_name,
                "version": self._analyzer_version,
                "inputs": dict(inputs),
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    async def get(self, key: str) -> JobResult | None:
        return await read(self._db, lambda conn: job_store.get_result(conn, key))

    async def get_or_compute(
        self, key: str, sha256: str, compute: Callable[[], Awaitable[JobResult]]
    ) -> JobResult:
        """The cached result (``reused``), or the result of ``compute`` stored under ``key``.

        If the job computing ``key`` fails, one of the jobs waiting for it takes over.
        """
        while True:
            cached = await self.get(key)
            if cached is not None:
                self.hits += 1
                return cached
            in_flight = self._in_flight.get(key)
            if in_flight is None:
                break
            await asyncio.shield(in_flight)
        self.misses += 1
        done = asyncio.get_running_loop().create_future()
        self._in_flight[key] = done
        try:
            result = await compute()
            stored_at = time.time()
            await write(
                self._db,
                lambda conn: job_store.store_result(conn, key, sha256, result, stored_at),
            )
            return result
        finally:
            del self._in_flight[key]
            done.set_result(None)
