"""Result reuse: a durable cache by content and analyser, with single flight.

The key is (sha256, analyser name + version, every input that changes the result), so a
new analyser version or a different category (for analysers that use it) is a miss.
A new result is stored by the transaction that completes its job. While a key is being
analysed, other jobs with that key wait for that call (and that completion) instead of
making a second one: in this process through a future, across processes sharing the
database through a claim on the key in the store. The claim has a short lease that its
holder renews while it analyses, so a slow analysis keeps the key and a dead holder's is
taken over within one lease. Waiting for another's analysis is no part of a job's own
analysis (see :mod:`analysis_service.domain.workers`). A :class:`Degraded` result completes
its job only: it is not stored, and the jobs waiting for it analyse the content again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence

from analysis_service.domain.gathering import Gathering
from analysis_service.domain.models import JobResult
from analysis_service.domain.store import NewResult, QueueStore

logger = logging.getLogger(__name__)

# How often a process waiting for another process's analysis of a key looks for its result.
OTHER_HOLDER_POLL = 0.25
# The most keys looked up in one round trip (the workers of a process ask at once), and the
# look-ups under way at once: a worker whose job comes while one is under way need not wait
# for it to end (with 4 workers and one at a time, the workers fell into step behind it).
MAX_LOOK_UP_BATCH = 64
MAX_LOOK_UPS = 2


@dataclasses.dataclass(frozen=True)
class Degraded:
    """A computed result not to reuse: the analyser's fallback after an upstream answer it
    could not use. Its job completes with it; the next one with its content computes again."""

    result: JobResult


class ResultCache:
    """Cached results by key; ``get_or_compute`` runs at most one computation per key."""

    def __init__(
        self,
        store: QueueStore,
        *,
        analyzer_name: str,
        analyzer_version: str,
        claim_seconds: float = 30.0,
    ) -> None:
        self._store = store
        self._analyzer_name = analyzer_name
        self._analyzer_version = analyzer_version
        # The lease of a claim on a key, renewed every third of it while the key is analysed:
        # how long the other processes wait for a holder that died before taking the key over.
        self._claim_seconds = claim_seconds
        self._holder = uuid.uuid4().hex
        # The keys this process is analysing; each future holds the result once computed.
        self._in_flight: dict[str, asyncio.Future[JobResult | None]] = {}
        # The look-ups started ahead (see look_up_ahead) that no job has taken yet.
        self._ahead: dict[str, asyncio.Task[JobResult | bool]] = {}
        # The renewals of the claims this process holds (a task needs a reference to run).
        self._renewals: set[asyncio.Task[None]] = set()
        # Distinct keys: a key is looked up only by the job that put it in ``_in_flight``.
        self._looking_up = Gathering(
            self._look_up_all, max_batch=MAX_LOOK_UP_BATCH, max_calls=MAX_LOOK_UPS
        )
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

    async def get_or_compute(
        self,
        key: str,
        sha256: str,
        compute: Callable[[], Awaitable[JobResult | Degraded]],
        record: Callable[[JobResult, str, NewResult | None], Awaitable[None]],
    ) -> JobResult:
        """The cached result (``reused``), or the result of ``compute``: handed to ``record``
        (the job's completion) with the key it is kept under, then returned.

        A computed result comes to ``record`` with its :class:`NewResult`, for the
        completion's transaction to keep in the store (one transaction per job, not two); if
        ``record`` fails, the result is stored on its own. The jobs of this process waiting
        for ``key`` take the result once ``record`` is done (its transaction may still be
        queued: theirs store the result too, if it is not yet); if the job computing it
        fails, or its result is :class:`Degraded` (kept under a key of its own, which no job
        looks up, and the claim on the key dropped), one of them takes over: a fallback's
        result serves no job but its own, in this process as in others.
        """
        while True:
            looking_up: Awaitable[JobResult | bool] | None = self._ahead.pop(key, None)
            if looking_up is not None:
                # Looked up ahead (registered in _in_flight then): this job's now.
                done = self._in_flight[key]
            else:
                in_flight = self._in_flight.get(key)
                if in_flight is not None:
                    computed = await asyncio.shield(in_flight)
                    if computed is None:
                        continue
                    self.hits += 1
                    reused = dataclasses.replace(computed, reused=True)
                    await record(reused, key, NewResult(sha256, None))
                    return reused
                # Registered before the store is asked: the jobs of this process wait here.
                done = asyncio.get_running_loop().create_future()
                self._in_flight[key] = done
                looking_up = self._look_up(key)
            try:
                found = await looking_up
            except BaseException:
                self._finish(key, done)
                raise
            if found is True:
                break
            self._finish(key, done)
            if isinstance(found, JobResult):
                self.hits += 1
                await record(found, key, None)
                return found
            # Another process analyses this content: its result will be in the store (or
            # its claim dropped, or lapsed unrenewed as its holder died, and this one takes
            # over).
            await asyncio.sleep(OTHER_HOLDER_POLL)
        self.misses += 1
        holder = self._holder if self._store.shared else None
        renewal = None if holder is None else self._renew(key, holder)
        # What the jobs of this process waiting for the key take (None: they look again).
        result: JobResult | None = None
        try:
            try:
                fresh = await compute()
            except BaseException:
                if renewal is not None:
                    await self._let_go(key, renewal)
                raise
            if isinstance(fresh, Degraded):
                # Not stored: the other processes' jobs waiting for the key take it over now.
                if renewal is not None:
                    await self._let_go(key, renewal)
                # Kept for its job (whose result is read through its key) under a key of its
                # own, unlike any content's: no other job finds it.
                own_key = hashlib.sha256(f"{key}:degraded:{uuid.uuid4()}".encode()).hexdigest()
                await record(fresh.result, own_key, NewResult(sha256, None))
                return fresh.result
            try:
                await record(fresh, key, NewResult(sha256, holder))
            except BaseException:
                # Its transaction failed or never ran: keep the result all the same (a
                # second store of a key changes nothing).
                with contextlib.suppress(Exception):
                    await asyncio.shield(
                        self._store.store_result(key, sha256, fresh, holder=holder)
                    )
                raise
            result = fresh
            return fresh
        finally:
            if renewal is not None:
                # Not waited for: a renewal after the result is stored finds it and takes
                # nothing (the completion written behind ends the claim, within its lease).
                renewal.stopping.set()
            self._finish(key, done, result)

    def look_up_ahead(self, key: str) -> None:
        """Start looking ``key`` up for a job a worker will start soon (claimed ahead): the
        first job with that key to call :meth:`get_or_compute` takes the answer. A key
        already being looked up or analysed in this process is left as it is."""
        if key in self._in_flight:
            return
        self._in_flight[key] = asyncio.get_running_loop().create_future()
        # Its answer (or error) goes to the job that takes it, or to forget_ahead: the queue
        # starts or gives back every job claimed ahead.
        self._ahead[key] = asyncio.create_task(self._look_up(key), name="look-up-ahead")

    async def forget_ahead(self, key: str) -> None:
        """Let go of the look-up ahead of ``key`` if no job took it (its job went back
        unstarted): a claim it took on the key is dropped, not left for other processes to
        wait out. Errors are the store's to report; the claim then expires."""
        looking_up = self._ahead.pop(key, None)
        if looking_up is None:
            return
        done = self._in_flight[key]
        try:
            # Dropped before this process's waiters look again (they would take it anew).
            if await looking_up is True and self._store.shared:
                await self._store.drop_analysis(key, self._holder)
        except Exception as error:
            logger.warning("claim on a result key looked up ahead not dropped: %s", error)
        finally:
            self._finish(key, done)

    async def _look_up(self, key: str) -> JobResult | bool:
        """The stored result, else whether this process is now the one analysing ``key``
        (always, when no other process shares the store): one round trip with the keys the
        other workers look up at the same moment."""
        return await self._looking_up.ask(key)

    async def _let_go(self, key: str, renewal: _Renewal) -> None:
        """Drop this process's claim on ``key``; on error, it lapses within its lease."""
        with contextlib.suppress(Exception):
            # A renewal landing after the drop would take the key again.
            await renewal.stop()
            await asyncio.shield(self._store.drop_analysis(key, self._holder))

    def _renew(self, key: str, holder: str) -> _Renewal:
        renewal = _Renewal(self._store, key, holder, self._claim_seconds)
        self._renewals.add(renewal.task)
        renewal.task.add_done_callback(self._renewals.discard)
        return renewal

    async def _look_up_all(self, keys: Sequence[str]) -> Sequence[JobResult | bool]:
        if self._store.shared:
            return await self._store.take_analyses(keys, self._holder, self._claim_seconds)
        return [found or True for found in await self._store.cached_results(keys)]

    def _finish(
        self, key: str, done: asyncio.Future[JobResult | None], result: JobResult | None = None
    ) -> None:
        del self._in_flight[key]
        done.set_result(result)


class _Renewal:
    """Renews ``holder``'s claim on ``key`` every third of its lease until told to stop."""

    def __init__(self, store: QueueStore, key: str, holder: str, lease_seconds: float) -> None:
        self._store = store
        self._key = key
        self._holder = holder
        self._lease_seconds = lease_seconds
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="renew-result-claim")

    async def stop(self) -> None:
        """Stop, once a renewal under way has ended."""
        self.stopping.set()
        await asyncio.shield(self.task)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._lease_seconds / 3):
                    await self.stopping.wait()
                return
            try:
                # Asked again by its holder, a live claim is renewed (and a lapsed one no
                # other process took is taken again).
                (kept,) = await self._store.take_analyses(
                    [self._key], self._holder, self._lease_seconds
                )
            except Exception as error:
                # The claim runs on its lease meanwhile; the next renewal may pass.
                logger.warning("claim on a result key not renewed: %s", error)
                continue
            if kept is False and not self.stopping.is_set():
                # (Once stopping, the result this holder just stored may have refused it.)
                logger.warning(
                    "claim on result key %s lapsed and another process took it over: "
                    "this content is analysed twice",
                    self._key,
                )
            if kept is not True:
                # Another holder's, or a result is stored: nothing left to keep.
                return
