"""Procrastinate, a PostgreSQL job queue, on no-op jobs: the yardstick of the scale benchmark.

Its schema goes into a new database; one batch of jobs is deferred, then one worker with
``concurrency`` runs them until none is left (``wait=False``), in this process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import procrastinate


@dataclass(frozen=True)
class ProcrastinateRun:
    """Seconds to defer the batch and to work it off."""

    jobs: int
    defer_seconds: float
    work_seconds: float

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / (self.defer_seconds + self.work_seconds)


async def run_procrastinate(url: str, *, jobs: int, concurrency: int) -> ProcrastinateRun:
    """Defer ``jobs`` no-op jobs in one batch at the empty database ``url``, then run them."""
    connector = procrastinate.PsycopgConnector(conninfo=url)
    app = procrastinate.App(connector=connector)

    @app.task(name="noop")
    async def noop() -> None:
        """Does nothing: what is measured is the queue."""

    # Its worker logs a line per job at INFO.
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        started = time.perf_counter()
        await noop.batch_defer_async(*({} for _ in range(jobs)))
        deferred = time.perf_counter()
        await app.run_worker_async(
            concurrency=concurrency, wait=False, install_signal_handlers=False, delete_jobs="never"
        )
        worked = time.perf_counter()
        done = await connector.execute_query_one_async(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'succeeded'"
        )
    if done["n"] != jobs:
        raise RuntimeError(f"procrastinate: {done['n']} jobs succeeded, expected {jobs}")
    return ProcrastinateRun(jobs, deferred - started, worked - deferred)
