"""The claims of one replica's workers: grouped, and made ahead of the workers.

Concurrent claims go in one transaction (with the ends of attempts queued beside them: see
:mod:`analysis_service.domain.queue`). The workers' next jobs are claimed ahead, in those same
transactions: as many as the workers will start within ``AHEAD_HORIZON`` at the rate they have
been starting them (none for an analyser that takes seconds: a job claimed ahead on a busy
replica would wait there while another replica is free); one that no worker starts within
``READY_TTL`` is given back, its attempt not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from analysis_service.domain.clock import Clock
from analysis_service.domain.models import (
    AttemptOutcome,
    ClaimedJob,
    JobError,
    JobStatus,
    StatusEvent,
)
from analysis_service.domain.store import AttemptEnd
from mediatag_common.group_commit import GroupCommit

logger = logging.getLogger(__name__)

RELEASED = JobError("RELEASED", "the worker stopped before finishing (shutdown)", True)
# A job claimed ahead (see MAX_AHEAD) that no worker of this replica started: it was never
# worked on, and its attempt says so rather than telling of a worker that stopped.
NOT_STARTED = JobError(
    "NOT_STARTED",
    "claimed ahead by this replica but not started (not in time, or a pause or shutdown came"
    " first); given back for any replica to take",
    True,
)

# Jobs claimed ahead of the workers, at most; the workers' start rate is counted over
# RATE_WINDOW seconds, and what they would start within AHEAD_HORIZON at that rate is kept
# ready (a few transactions' worth when jobs take milliseconds, none when they take seconds).
MAX_AHEAD = 128
RATE_WINDOW = 0.5
AHEAD_HORIZON = 0.1
# A job claimed ahead that no worker started within this many seconds goes back to PENDING
# (well inside the lease, which is not renewed until a worker starts the job).
READY_TTL = 1.0


class ClaimsAhead(Protocol):
    """Told of the jobs claimed ahead, to prepare them before a worker starts one."""

    def claimed_ahead(self, job: ClaimedJob) -> None:
        """``job`` is claimed ahead: a worker of this process is likely to start it soon."""

    async def given_back(self, jobs: Sequence[ClaimedJob]) -> None:
        """``jobs``, claimed ahead, go back unstarted (raises nothing)."""


def given_back(job: ClaimedJob, why: JobError) -> AttemptEnd:
    """``job`` back to PENDING at once, its attempt ended as RELEASED (``why``) and not
    counted."""
    return AttemptEnd(
        job,
        JobStatus.PENDING,
        AttemptOutcome.RELEASED,
        job.attempt - 1,
        attempt_error=why,
        delay=0.0,
    )


class Claims:
    """Claims jobs for this replica's workers, grouped, and ahead of them.

    ``claim_batch(n)`` leases up to ``n`` due jobs in one transaction; ``end`` writes the end
    of an attempt (here, a claim given back); ``wake`` tells idle workers a job is ready.
    """

    def __init__(
        self,
        claim_batch: Callable[[int], Awaitable[Sequence[ClaimedJob]]],
        end: Callable[[AttemptEnd], Awaitable[StatusEvent]],
        wake: Callable[[], None],
        clock: Clock,
    ) -> None:
        self._claim_batch = claim_batch
        self._end = end
        self._wake = wake
        self._clock = clock
        self._group: GroupCommit[None, ClaimedJob | None] = GroupCommit(self._claim_group)
        # Jobs claimed ahead for this process's next claims, oldest first, with when they were
        # claimed; the claims ahead under way; when the workers started their recent jobs.
        self._ready: deque[tuple[ClaimedJob, float]] = deque()
        self._claiming_ahead: set[asyncio.Future[ClaimedJob | None]] = set()
        self._starts: deque[float] = deque(maxlen=int(MAX_AHEAD * RATE_WINDOW / AHEAD_HORIZON))
        self._giving_back: asyncio.Task[None] | None = None
        # Set by close: the give-back stops waiting and leaves the rest to close.
        self._closing = asyncio.Event()
        self._listener: ClaimsAhead | None = None

    def tell(self, listener: ClaimsAhead) -> None:
        """Tell ``listener`` of every job claimed ahead, and of those given back unstarted."""
        self._listener = listener

    async def claim(self) -> ClaimedJob | None:
        """A job claimed ahead if there is one, else the next due job, or None. Tops up the
        jobs claimed ahead."""
        now = self._clock.monotonic()
        if self._ready:
            job, _ = self._ready.popleft()
            self._started(now)
            return job
        claiming = self._group.enqueue(None)
        self._claim_ahead(now)
        try:
            claimed = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # The claim goes on without its caller and may commit: a job leased to a worker
            # that is gone would wait out its lease and lose an attempt. Give it back (if
            # that fails too, the lease expiry is what is left).
            with contextlib.suppress(Exception):
                if (lost := await claiming) is not None:
                    await self._end(given_back(lost, RELEASED))
            raise
        if claimed is None:
            # The due jobs may have gone to claims ahead: this caller's, once they land.
            if self._claiming_ahead:
                await asyncio.wait(set(self._claiming_ahead))
            if self._ready:
                claimed, _ = self._ready.popleft()
        if claimed is not None:
            self._started(self._clock.monotonic())
        return claimed

    async def give_back_ready(self) -> None:
        """Give back every job claimed ahead that no worker has taken (a pause, a shutdown)."""
        ready = [job for job, _ in self._ready]
        self._ready.clear()
        await self._give_back(ready)

    async def close(self) -> None:
        """Wait for the claims under way; give back the jobs claimed ahead that no worker took."""
        if self._claiming_ahead:
            await asyncio.wait(self._claiming_ahead)
        await self._group.close()
        if self._giving_back is not None:
            # Not cancelled: one cancelled while telling the listener would leave the jobs it
            # took off the ready list leased, each to lose an attempt when its lease expired.
            self._closing.set()
            await self._giving_back
        await self.give_back_ready()

    def _started(self, now: float) -> None:
        """A worker starts a job: counted for the rate, and the jobs ahead topped up."""
        self._starts.append(now)
        self._claim_ahead(now)

    def _claim_ahead(self, now: float) -> None:
        """Claim what the workers will start within AHEAD_HORIZON, less what is ready or
        being claimed; the claims go with the next group of claims and ends."""
        while self._starts and self._starts[0] < now - RATE_WINDOW:
            self._starts.popleft()
        wanted = min(MAX_AHEAD, int(len(self._starts) * AHEAD_HORIZON / RATE_WINDOW))
        for _ in range(wanted - len(self._ready) - len(self._claiming_ahead)):
            claiming = self._group.enqueue(None)
            self._claiming_ahead.add(claiming)
            claiming.add_done_callback(self._claimed_ahead)

    def _claimed_ahead(self, claiming: asyncio.Future[ClaimedJob | None]) -> None:
        self._claiming_ahead.discard(claiming)
        # A failed claim ahead is no worker's: the next claim tries again.
        if claiming.cancelled() or claiming.exception() is not None:
            return
        job = claiming.result()
        if job is None:
            return
        self._ready.append((job, self._clock.monotonic()))
        if self._listener is not None:
            self._listener.claimed_ahead(job)
        self._wake()
        if self._giving_back is None or self._giving_back.done():
            self._giving_back = asyncio.create_task(self._give_back_unstarted(), name="give-back")

    async def _give_back_unstarted(self) -> None:
        """Give back the jobs claimed ahead that no worker started within READY_TTL."""
        while self._ready and not self._closing.is_set():
            _, claimed_at = self._ready[0]
            wait = claimed_at + READY_TTL - self._clock.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), wait)
                continue
            expired = []
            while self._ready and self._ready[0][1] + READY_TTL <= self._clock.monotonic():
                expired.append(self._ready.popleft()[0])
            await self._give_back(expired)

    async def _give_back(self, jobs: Sequence[ClaimedJob]) -> None:
        """Release ``jobs`` (claimed ahead, never started) in one group; one that cannot be
        released goes back when its lease expires."""
        if self._listener is not None and jobs:
            await self._listener.given_back(jobs)
        released = await asyncio.gather(
            *(self._end(given_back(job, NOT_STARTED)) for job in jobs), return_exceptions=True
        )
        for job, outcome in zip(jobs, released, strict=True):
            if isinstance(outcome, Exception):
                logger.warning(
                    "media %s claimed ahead not given back: %s", job.spec.media_id, outcome
                )

    async def _claim_group(self, requests: Sequence[None]) -> list[ClaimedJob | None]:
        claimed = await self._claim_batch(len(requests))
        return [*claimed, *[None] * (len(requests) - len(claimed))]
