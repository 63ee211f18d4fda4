"""The worker pool: claim a job, analyse it under the rate limits, record the outcome.

Concurrency (workers) and rate (limiters) are separate knobs. Each busy worker renews its
lease with a heartbeat; on shutdown, workers get the grace period to finish and then give
their jobs back to PENDING. A completion is written behind (see
:mod:`analysis_service.domain.queue`): the worker takes its next job while the job it
finished keeps its lease, until the completion commits and its outcome is reported. The
jobs the queue claims ahead are looked up in the cache and read before a worker starts them
(see :mod:`analysis_service.domain.read_ahead`). The analyser timeout bounds a job's own
analysis: not its wait for a rate limit, nor for another job's (or replica's) analysis of
the same content, which the cache's single flight makes it wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable

from analysis_service.analyzers.base import AnalysisInput, Analyzer
from analysis_service.domain.cache import Degraded, ResultCache
from analysis_service.domain.clock import SYSTEM_CLOCK, Clock
from analysis_service.domain.content import ContentSource
from analysis_service.domain.limits import RateLimits
from analysis_service.domain.models import (
    AttemptOutcome,
    ClaimedJob,
    JobError,
    JobResult,
    JobSpec,
    JobStatus,
    StatusEvent,
)
from analysis_service.domain.observer import AnalysisObserver, CallOutcome
from analysis_service.domain.queue import JobQueue, lease_lost
from analysis_service.domain.read_ahead import ReadAhead
from analysis_service.domain.stats import Throughput
from analysis_service.domain.store import NewResult
from analysis_service.errors import (
    AnalysisError,
    AnalyzerFailure,
    ContentUnavailable,
    LeaseLost,
    QuotaExceeded,
    StorageConflict,
    StorageUnavailable,
)

logger = logging.getLogger(__name__)

IDLE_POLL = 5.0
STORAGE_RETRY = 1.0


class _MeteredCall:
    """The rate limiter one analyser call sees.

    It notes the time the call spent waiting for limiters (and reports each wait) and
    leaves it out of the call's latency and of its ``deadline`` (the analyser timeout
    bounds the analyser, not the queue for a rate limit a quota refusal may have paused for
    a minute), and the last API it asked for: by the Analyzer contract a slot is acquired
    before each upstream call, so an error belongs to that API.
    """

    def __init__(
        self,
        limits: RateLimits,
        deadline: asyncio.Timeout,
        observer: AnalysisObserver,
        clock: Clock,
    ) -> None:
        self._limits = limits
        self._deadline = deadline
        self._observer = observer
        self._clock = clock
        self.waited = 0.0
        self.last_api = "none"

    async def acquire(self, api: str) -> None:
        # The deadline is suspended while waiting, then moved on by the time waited.
        when = self._deadline.when()
        self._deadline.reschedule(None)
        started = self._clock.monotonic()
        try:
            await self._limits.acquire(api)
        finally:
            waited = self._clock.monotonic() - started
            self.waited += waited
            if when is not None:
                self._deadline.reschedule(when + waited)
        self._observer.waited_for_limit(api, waited)
        self.last_api = api


class WorkerPool:
    """``size`` workers sharing one queue, analyser, cache and set of rate limits."""

    def __init__(
        self,
        *,
        queue: JobQueue,
        analyzer: Analyzer,
        limits: RateLimits,
        cache: ResultCache,
        content: ContentSource,
        size: int,
        analyzer_timeout: float,
        throughput: Throughput,
        observer: AnalysisObserver,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if size < 0:
            raise ValueError("the worker pool cannot have fewer than no workers")
        self._queue = queue
        self._analyzer = analyzer
        self._limits = limits
        self._cache = cache
        # Jobs claimed ahead are looked up and read before a worker starts them.
        self._read_ahead = ReadAhead(cache, content, self._cache_key)
        queue.tell_claims_ahead(self._read_ahead)
        self.size = size
        self._analyzer_timeout = analyzer_timeout
        self._throughput = throughput
        self._observer = observer
        self._clock = clock
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        # Completions written behind, each waited for (lease kept, outcome reported) here.
        self._finishing: set[asyncio.Task[None]] = set()
        self.busy = 0

    def start(self) -> None:
        instance = uuid.uuid4().hex[:8]
        self._tasks = [
            asyncio.create_task(self._run(f"{instance}-{n}"), name=f"worker-{n}")
            for n in range(self.size)
        ]

    async def drain(self, grace: float) -> None:
        """Stop claiming; give in-flight jobs ``grace`` seconds, then release them."""
        self._stopping = True
        self._queue.wake_workers()
        if not self._tasks:
            return
        _, unfinished = await asyncio.wait(self._tasks, timeout=grace)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if unfinished:
            logger.info("released %d unfinished job(s) back to PENDING", len(unfinished))
        if self._finishing:
            # Queued completions are written (or fail) on their own; their outcomes follow.
            await asyncio.wait(set(self._finishing))

    async def _run(self, worker_id: str) -> None:
        while not self._stopping:
            try:
                job = await self._queue.claim()
                if job is None:
                    await self._queue.wait_for_work(IDLE_POLL)
                    continue
            except (StorageUnavailable, StorageConflict) as exc:
                logger.error("worker %s cannot claim: %s", worker_id, exc)
                await asyncio.sleep(STORAGE_RETRY)
                continue
            self.busy += 1
            try:
                await self._process(job)
            finally:
                self.busy -= 1

    async def _process(self, job: ClaimedJob) -> None:
        spec = job.spec
        logger.info(
            "processing media %s (attempt %d, owner %s)",
            spec.media_id,
            job.attempt,
            spec.owner_id,
            extra={"media_id": spec.media_id, "attempt": job.attempt},
        )
        started = self._clock.monotonic()
        heartbeat = asyncio.create_task(self._heartbeat(job))
        completion: list[asyncio.Future[StatusEvent]] = []
        outcome = AttemptOutcome.RELEASED
        try:
            outcome = await self._record(
                job,
                self._unless_lease_lost(
                    job, heartbeat, self._analyze_and_complete(job, started, completion)
                ),
            )
        except asyncio.CancelledError:
            with contextlib.suppress(AnalysisError):
                await self._queue.release(job)
            raise
        finally:
            if outcome is AttemptOutcome.COMPLETED:
                finishing = asyncio.create_task(
                    self._finish(job, completion[0], heartbeat, started), name="finish"
                )
                self._finishing.add(finishing)
                finishing.add_done_callback(self._finishing.discard)
            else:
                heartbeat.cancel()
                self._observer.attempt_ended(
                    outcome, self._clock.monotonic() - started, job.attempt
                )

    async def _finish(
        self,
        job: ClaimedJob,
        completion: asyncio.Future[StatusEvent],
        heartbeat: asyncio.Task[None],
        started: float,
    ) -> None:
        """Keep the lease until the completion written behind commits; report its outcome."""
        outcome = AttemptOutcome.NOT_RECORDED
        try:
            outcome = await self._record(job, completion)
        finally:
            heartbeat.cancel()
            self._observer.attempt_ended(outcome, self._clock.monotonic() - started, job.attempt)

    async def _unless_lease_lost(
        self, job: ClaimedJob, heartbeat: asyncio.Task[None], work: Awaitable[None]
    ) -> None:
        """Run ``work``; cancel it, raising LeaseLost, if the heartbeat finds the lease lost
        first: another attempt has the job, this one's outcome would be dropped, and its
        further upstream calls would spend the rate limit for nothing."""
        attempt = asyncio.timeout(None)

        def stop(beat: asyncio.Task[None]) -> None:
            # The heartbeat returns only when the lease is lost.
            if not beat.cancelled() and beat.exception() is None:
                attempt.reschedule(asyncio.get_running_loop().time())

        try:
            async with attempt:
                heartbeat.add_done_callback(stop)
                try:
                    await work
                finally:
                    heartbeat.remove_done_callback(stop)
        except TimeoutError:
            if attempt.expired():
                raise lease_lost(job) from None
            raise

    def _cache_key(self, spec: JobSpec) -> str:
        return self._cache.key(
            spec.sha256, self._analyzer.cache_inputs(spec.category, spec.context)
        )

    async def _analyze_and_complete(
        self, job: ClaimedJob, started: float, completion: list[asyncio.Future[StatusEvent]]
    ) -> None:
        """Analyse the job (or reuse a cached result) and queue its completion, put in
        ``completion``."""
        spec = job.spec
        key, content = self._read_ahead.start(job)

        async def complete(
            result: JobResult, result_key: str, new_result: NewResult | None
        ) -> None:
            completion.append(
                await self._queue.complete(job, result, result_key, new_result=new_result)
            )

        # The bytes are read while the cache is asked: the two round trips overlap instead of
        # adding up (a cached result, the rare case, wastes the read). The analyser's
        # deadline bounds the analysis alone (see _analyze): a job waiting for another's
        # analysis of its content uses no attempt however long rate limits hold that one. Its
        # heartbeat keeps its lease; the wait ends with the result stored, or the other's
        # claim on the key dropped or lapsed unrenewed (its holder died), and this job analyses.
        try:
            result = await self._cache.get_or_compute(
                key, spec.sha256, lambda: self._analyze(job, content), complete
            )
        finally:
            content.cancel()
        duration = self._clock.monotonic() - started
        self._throughput.record(duration)
        logger.info(
            "done media %s%s: tags %s (%d-dim embedding) in %.0f ms",
            spec.media_id,
            " (reused cached result)" if result.reused else "",
            ", ".join(result.tags) or "(none)",
            result.embedding_dimensions,
            duration * 1000,
            extra={
                "media_id": spec.media_id,
                "attempt": job.attempt,
                "duration_ms": round(duration * 1000, 1),
            },
        )

    async def _analyze(self, job: ClaimedJob, reading: Awaitable[bytes]) -> JobResult | Degraded:
        """Analyse the job's bytes within the analyser timeout."""
        async with asyncio.timeout(self._analyzer_timeout) as deadline:
            return await self._call_analyzer(job, await reading, deadline)

    async def _call_analyzer(
        self, job: ClaimedJob, content: bytes, deadline: asyncio.Timeout
    ) -> JobResult | Degraded:
        spec = job.spec
        logger.info(
            "analysing media %s with %s (%s)",
            spec.media_id,
            self._analyzer.name,
            spec.category or "no category",
            extra={"media_id": spec.media_id},
        )
        call = _MeteredCall(self._limits, deadline, self._observer, self._clock)
        started = self._clock.monotonic()
        try:
            output = await self._analyzer.analyze(
                AnalysisInput(
                    media_id=spec.media_id,
                    content=content,
                    content_type=spec.content_type,
                    sha256=spec.sha256,
                    category=spec.category,
                    context=spec.context,
                ),
                call,
            )
        except Exception as exc:
            api = call.last_api
            if isinstance(exc, QuotaExceeded):
                outcome, api = CallOutcome.QUOTA, exc.api
            elif isinstance(exc, AnalyzerFailure):
                outcome = CallOutcome.TRANSIENT if exc.transient else CallOutcome.PERMANENT
            else:
                outcome = CallOutcome.INTERNAL
            self._observer.analyzer_call_ended(
                outcome, self._clock.monotonic() - started - call.waited, api
            )
            raise
        self._observer.analyzer_call_ended(
            CallOutcome.OK, self._clock.monotonic() - started - call.waited, call.last_api
        )
        self._limits.succeeded([limit.api for limit in self._analyzer.api_limits])
        result = JobResult(
            tags=output.tags,
            embedding=output.embedding,
            embedding_dimensions=int(output.embedding.shape[0]),
            analyzer_name=self._analyzer.name,
            analyzer_version=self._analyzer.version,
            reused=False,
        )
        return Degraded(result) if output.degraded else result

    async def _record(self, job: ClaimedJob, work: Awaitable[object]) -> AttemptOutcome:
        """Run ``work`` and turn its failure into the job's next status; the attempt's outcome."""
        spec = job.spec
        try:
            try:
                await work
                return AttemptOutcome.COMPLETED
            except QuotaExceeded as exc:
                pause = await self._limits.quota_exceeded(exc.api, exc.retry_after)
                return await self._defer(job, exc, pause, AttemptOutcome.QUOTA_DEFERRED)
            except ContentUnavailable as exc:
                pause = self._queue.backoff(job.quota_deferrals + 1)
                return await self._defer(job, exc, pause, AttemptOutcome.CONTENT_DEFERRED)
            except AnalyzerFailure as exc:
                return await self._fail(job, JobError(exc.reason, exc.message, exc.transient))
            except TimeoutError:
                message = f"analysis took longer than {self._analyzer_timeout:.0f} s"
                return await self._fail(job, JobError("ANALYSIS_TIMEOUT", message, True))
            except (LeaseLost, StorageUnavailable):
                raise
            except Exception:
                # A bug, not the image's fault: logged in full, retried like a transient error.
                logger.exception("media %s: unexpected error during analysis", spec.media_id)
                error = JobError("INTERNAL", "an unexpected error in the analysis service", True)
                return await self._fail(job, error)
        except LeaseLost:
            logger.warning(
                "media %s: lease lost (expired and reclaimed); this worker's outcome is dropped",
                spec.media_id,
                extra={"media_id": spec.media_id},
            )
            return AttemptOutcome.LEASE_LOST
        except StorageUnavailable as exc:
            logger.error(
                "media %s: could not record the outcome (%s); the lease will expire and the job "
                "will be retried",
                spec.media_id,
                exc,
            )
            return AttemptOutcome.NOT_RECORDED

    async def _defer(
        self, job: ClaimedJob, refusal: AnalyzerFailure, delay: float, outcome: AttemptOutcome
    ) -> AttemptOutcome:
        """Put the job off for ``delay`` without using an attempt; the attempt's outcome."""
        error = JobError(refusal.reason, refusal.message, True)
        event = await self._queue.defer(job, outcome, error, delay)
        if event.status is JobStatus.FAILED:
            return AttemptOutcome.FAILED
        logger.warning(
            "media %s put off for %.1f s (%s: %s); attempt not counted",
            job.spec.media_id,
            delay,
            refusal.reason,
            refusal.message,
            extra={"media_id": job.spec.media_id, "attempt": job.attempt},
        )
        return outcome

    async def _fail(self, job: ClaimedJob, error: JobError) -> AttemptOutcome:
        """Record a failed attempt; its outcome (a retry is scheduled, or the job failed)."""
        event = await self._queue.fail_attempt(job, error)
        spec = job.spec
        if event.next_attempt_at is not None:
            logger.warning(
                "media %s attempt %d failed (%s: %s); retrying in %.1f s",
                spec.media_id,
                job.attempt,
                error.reason,
                error.message,
                event.next_attempt_at - event.event_time,
                extra={"media_id": spec.media_id, "attempt": job.attempt},
            )
            return AttemptOutcome.RETRY_SCHEDULED
        logger.error(
            "media %s FAILED on attempt %d (%s: %s)",
            spec.media_id,
            job.attempt,
            error.reason,
            error.message,
            extra={"media_id": spec.media_id, "attempt": job.attempt},
        )
        return AttemptOutcome.FAILED

    async def _heartbeat(self, job: ClaimedJob) -> None:
        """Renew the job's lease every third of it; return when it is lost."""
        interval = self._queue.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._queue.renew_lease(job):
                    return
            except StorageUnavailable as exc:
                logger.error("media %s: lease renewal failed: %s", job.spec.media_id, exc)
