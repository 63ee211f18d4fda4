"""The scale benchmark's measurements: the queue alone (mediatag's on SQLite and PostgreSQL,
Procrastinate), then analysis replicas on one PostgreSQL (the pipeline, the watch delay across
replicas, watchers apart from the workers, the seed run under one limit). A part that cannot
run gives why, as a string, in place of its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TypeVar

from mediatag.analysis.v1 import analysis_pb2, analysis_pb2_grpc

from bench.pipeline import CALL_TIMEOUT, Completions, distinct_images, running_ingest, upload_all
from bench.processes import free_ports
from bench.procrastinate_queue import run_procrastinate
from bench.queue_alone import QueueAlone, job_specs
from bench.scale_cluster import CpuMeter, Postgres, running_replicas
from bench.scale_report import (
    WATCHERS_CLIENT,
    WATCHERS_REPLICA,
    ApartFigures,
    ApartRound,
    DelayFigures,
    Row,
    SeedFigures,
    median_row,
)
from bench.sim_server import SimServer
from bench.watcher_process import WatcherProcess, watching_apart
from bench.watchers import Receipts, watching
from mediatag_common.database import sqlite_url

SYNCHRONOUS = "FULL"
WORKERS = 4
BATCH = 100
_DIMENSIONS = 16
# A run slower than this many jobs/s is declared stuck.
_STUCK_BELOW = 20.0
# The watch delay is measured under a steady flow of changes, not a saturated one.
DELAY_RATE = 100.0
SEED_LATENCY = 1.0
SEED_RATE = 10.0
SEED_BURST = 1
SEED_WORKERS = 16
_WATCHER_CHANNELS = 10
# Jobs through the replicas, untimed, before the watchers-apart phases: a fresh pair of
# replicas often does its first jobs slower (in a trial, 266 jobs/s in a first phase against
# 513 in the second), and that would fall on whichever phase goes first.
APART_WARM_UP = 2 * BATCH
_OPEN_TIMEOUT = 120.0
_ERROR_CHARS = 300

T = TypeVar("T")
logger = logging.getLogger(__name__)


async def part(measurement: Awaitable[T]) -> T | str:
    """The part's figures, or why it could not run (the other parts go on)."""
    try:
        return await measurement
    except Exception as error:
        logger.debug("part failed", exc_info=True)
        return _why(error)


def _why(error: BaseException) -> str:
    """One line: the first error inside any group, and the last line of its message (a
    server's log ends with the exception it exited with)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    return f"{type(error).__name__}: {last[:_ERROR_CHARS]}"


async def queue_rows(root: Path, pg: Postgres, jobs: int, rounds: int) -> list[Row]:
    """The JobQueue alone on SQLite and PostgreSQL, then Procrastinate (the ratios' base), in
    ``rounds`` rounds: each configuration's round of median jobs/s (one run of each, and
    Procrastinate's especially, moves a lot between runs on a shared machine)."""
    measured: dict[str, list[Row]] = {}
    for number in range(1, rounds + 1):
        print(f"measuring the queue alone, round {number} of {rounds} ...", flush=True)
        for name, url in (
            ("mediatag queue, SQLite", sqlite_url(str(root / f"alone{number}.db"))),
            ("mediatag queue, PostgreSQL", pg.new_database()),
        ):
            postmaster = None if url.startswith("sqlite") else pg.postmaster_pid()
            row = await _part_row(name, _queue_alone(name, url, jobs, postmaster))
            measured.setdefault(name, []).append(row)
        row = await _part_row("Procrastinate, PostgreSQL", _procrastinate(pg, jobs))
        measured.setdefault(row.name, []).append(row)
        _print_round(measured)
    return [median_row(rows) for rows in measured.values()]


def _print_round(measured: dict[str, list[Row]]) -> None:
    """The jobs/s of each configuration's latest run."""
    print(
        "  " + ", ".join(f"{name} {rows[-1].jobs_per_second:.1f}" for name, rows in
                         measured.items()) + " jobs/s",
        flush=True,
    )  # fmt: skip


async def _part_row(name: str, measurement: Awaitable[Row]) -> Row:
    measured = await part(measurement)
    return Row(name, error=measured) if isinstance(measured, str) else measured


async def _queue_alone(name: str, url: str, jobs: int, postmaster: int | None) -> Row:
    alone = QueueAlone(
        url, synchronous=SYNCHRONOUS, batch=BATCH, tasks=WORKERS, dimensions=_DIMENSIONS
    )
    meter = CpuMeter({"this process": os.getpid()}, postmaster)
    async with alone:
        meter.start()
        measured = await alone.run(job_specs(0, jobs))
        meter.stop()
    return Row(name, jobs, measured.seconds, meter.used)


async def _procrastinate(pg: Postgres, jobs: int) -> Row:
    url = pg.new_database()
    # Its schema goes in inside the measurement: a few milliseconds of CPU.
    meter = CpuMeter({"this process": os.getpid()}, pg.postmaster_pid())
    meter.start()
    measured = await run_procrastinate(url, jobs=jobs, concurrency=WORKERS)
    meter.stop()
    seconds = measured.defer_seconds + measured.work_seconds
    return Row("Procrastinate, PostgreSQL", jobs, seconds, meter.used)


class ReplicaRuns:
    """Analysis replicas against the one ingest that holds the images."""

    def __init__(self, root: Path, pg: Postgres, ingest_address: str, ingest_pid: int) -> None:
        self._root = root
        self._pg = pg
        self._ingest_address = ingest_address
        self._ingest_pid = ingest_pid
        self._runs = 0

    def _template(
        self, *, database_url: str | None, rate: float | None = None, burst: int = 1
    ) -> SimServer:
        """A replica's settings; without ``rate``, the simulated API has no limit."""
        return SimServer(
            port=0, data_dir=self._root, ingest_address=self._ingest_address, workers=WORKERS,
            latency=0.0, rate_per_second=rate, burst=burst, synchronous=SYNCHRONOUS,
            dimensions=_DIMENSIONS, database_url=database_url,
        )  # fmt: skip

    def _work_dir(self, name: str) -> Path:
        self._runs += 1
        work_dir = self._root / f"{self._runs}-{name}"
        work_dir.mkdir()
        return work_dir

    async def pipeline_rows(self, specs: Sequence[analysis_pb2.JobSpec], rounds: int) -> list[Row]:
        """Each configuration once per round, on a new database each time; its median row."""
        measured: dict[str, list[Row]] = {}
        for number in range(1, rounds + 1):
            print(f"measuring the pipeline, round {number} of {rounds} ...", flush=True)
            for name, replicas, url in (
                ("1 replica, SQLite", 1, None),
                *((f"{n} replica{'s' * (n > 1)}, PostgreSQL", n, "pg") for n in (1, 2, 3)),
            ):
                database = self._pg.new_database() if url else None
                row = await _part_row(name, self._pipeline(name, replicas, database, specs))
                measured.setdefault(name, []).append(row)
            _print_round(measured)
        return [median_row(rows) for rows in measured.values()]

    async def _pipeline(
        self, name: str, replicas: int, url: str | None, specs: Sequence[analysis_pb2.JobSpec]
    ) -> Row:
        template = self._template(database_url=url)
        async with running_replicas(
            self._work_dir("pipeline"), template, [WORKERS] * replicas
        ) as cluster:
            roles = {f"analysis {n + 1}": pid for n, pid in enumerate(cluster.pids)}
            meter = CpuMeter(
                {**roles, "ingest": self._ingest_pid, "client": os.getpid()},
                self._pg.postmaster_pid() if url else None,
            )
            seconds = await _submit_and_wait(cluster.stubs[0], specs, meter)
        return Row(name, len(specs), seconds, meter.used)

    async def watch_delays(self, specs: Sequence[analysis_pb2.JobSpec]) -> list[DelayFigures]:
        """A replica without workers and one with, each watched; changes flow at a steady
        rate (a limit) so that the delay is the watch's, not a backlog's."""
        print("measuring the watch delay across replicas ...", flush=True)
        template = self._template(database_url=self._pg.new_database(), rate=DELAY_RATE, burst=1)
        async with running_replicas(self._work_dir("delay"), template, [0, WORKERS]) as cluster:
            addresses = [f"127.0.0.1:{port}" for port in cluster.ports]
            async with (
                watching(addresses[0], count=1, channels=1, open_timeout=_OPEN_TIMEOUT) as other,
                watching(addresses[1], count=1, channels=1, open_timeout=_OPEN_TIMEOUT) as same,
            ):
                await _submit_and_wait(cluster.stubs[1], specs, None)
                status = await cluster.stubs[1].GetQueueStatus(
                    analysis_pb2.GetQueueStatusRequest(), timeout=CALL_TIMEOUT
                )
                for pool in (other, same):
                    await asyncio.wait_for(
                        pool.wait_for_revision(status.current_revision), CALL_TIMEOUT
                    )
        return [
            DelayFigures.of("on the other replica (no workers)", _delays_ms(other.receipts)),
            DelayFigures.of("on the replica that committed", _delays_ms(same.receipts)),
        ]

    async def watchers_apart(
        self, specs: Sequence[analysis_pb2.JobSpec], watchers: int, cores: int, rounds: int
    ) -> ApartFigures:
        """The working replica's jobs/s without, then with, the watchers on the other: one
        pair per round on a new database, after a warm-up, in alternating order."""
        measured = []
        for number in range(1, rounds + 1):
            print(
                f"measuring {watchers} watchers apart from the workers, round {number} of "
                f"{rounds} ...",
                flush=True,
            )
            measured.append(await self._apart_round(specs, watchers, watched_first=number % 2 == 0))
            print(
                f"  {measured[-1].alone.jobs_per_second:.1f} -> "
                f"{measured[-1].watched.jobs_per_second:.1f} jobs/s",
                flush=True,
            )
        return ApartFigures(watchers, cores, measured)

    async def _apart_round(
        self, specs: Sequence[analysis_pb2.JobSpec], watchers: int, *, watched_first: bool
    ) -> ApartRound:
        """The warm-up's jobs, then half the rest in each phase. The watchers are a process
        of their own (``bench.watcher_process``): in this one they would hold up the calls
        and the timer of the phase they are measured against."""
        half = (len(specs) - APART_WARM_UP) // 2
        template = dataclasses.replace(
            self._template(database_url=self._pg.new_database()),
            max_watchers=watchers + 10,
        )
        async with running_replicas(self._work_dir("apart"), template, [0, WORKERS]) as cluster:
            pids = {
                WATCHERS_REPLICA: cluster.pids[0],
                "workers' replica": cluster.pids[1],
                "ingest": self._ingest_pid,
                "client": os.getpid(),
            }
            postmaster = self._pg.postmaster_pid()
            address = f"127.0.0.1:{cluster.ports[0]}"
            await _submit_and_wait(cluster.stubs[1], specs[:APART_WARM_UP], None)

            async def without_watchers(jobs: Sequence[analysis_pb2.JobSpec]) -> Row:
                meter = CpuMeter(pids, postmaster)
                seconds = await _submit_and_wait(cluster.stubs[1], jobs, meter)
                return Row("no watchers", len(jobs), seconds, meter.used)

            async def with_watchers(
                jobs: Sequence[analysis_pb2.JobSpec],
            ) -> tuple[Row, WatcherProcess, int]:
                async with watching_apart(
                    address, count=watchers, channels=_WATCHER_CHANNELS, open_timeout=_OPEN_TIMEOUT
                ) as held:
                    meter = CpuMeter({**pids, WATCHERS_CLIENT: held.pid}, postmaster)
                    started_ns = time.time_ns()
                    seconds = await _submit_and_wait(cluster.stubs[1], jobs, meter)
                row = Row(f"{watchers} watchers apart", len(jobs), seconds, meter.used)
                return row, held, started_ns

            first = specs[APART_WARM_UP : APART_WARM_UP + half]
            second = specs[APART_WARM_UP + half : APART_WARM_UP + 2 * half]
            if watched_first:
                watched, held, started_ns = await with_watchers(first)
                alone = await without_watchers(second)
            else:
                alone = await without_watchers(first)
                watched, held, started_ns = await with_watchers(second)
        # The streams read nothing before the phase's first submit (changes only, no bookmarks).
        read_from = (held.first_read_ns - started_ns) / 1e9 if held.changes else 0.0
        read_until = (held.last_read_ns - started_ns) / 1e9 if held.changes else 0.0
        return ApartRound(alone, watched, held.changes, read_from, read_until, held.ended)


async def _submit_and_wait(
    analysis: analysis_pb2_grpc.AnalysisServiceAsyncStub,
    specs: Sequence[analysis_pb2.JobSpec],
    meter: CpuMeter | None,
) -> float:
    """SubmitJobs in batches, then wait until a watcher there read every COMPLETED; the
    seconds from the first SubmitJobs to the last COMPLETED."""
    async with Completions(analysis, len(specs)) as completions:
        if meter is not None:
            meter.start()
        started = time.perf_counter()
        for first in range(0, len(specs), BATCH):
            request = analysis_pb2.SubmitJobsRequest(jobs=specs[first : first + BATCH])
            await analysis.SubmitJobs(request, timeout=CALL_TIMEOUT)
        times = await completions.wait(len(specs) / _STUCK_BELOW + CALL_TIMEOUT)
        if meter is not None:
            meter.stop()
    return times[-1] - started


def _delays_ms(receipts: Receipts) -> list[float]:
    return [
        (received - committed) / 1e6
        for committed, received in zip(receipts.committed_ns, receipts.received_ns, strict=True)
    ]


async def seed(root: Path, pg: Postgres, images: int) -> SeedFigures:
    """Three replicas under one limit, the images through UploadMedia; the calls as each
    replica's simulated API let them through."""
    print(f"\nmeasuring the seed run: 3 replicas, one limit of {SEED_RATE:g}/s ...", flush=True)
    work_dir = root / "seed"
    work_dir.mkdir()
    (ingest_port,) = free_ports(1)
    template = SimServer(
        port=0, data_dir=work_dir, ingest_address=f"127.0.0.1:{ingest_port}",
        workers=SEED_WORKERS, latency=SEED_LATENCY, rate_per_second=SEED_RATE,
        burst=SEED_BURST, synchronous=SYNCHRONOUS, database_url=pg.new_database(),
    )  # fmt: skip
    ideal = (images - 1) / SEED_RATE + SEED_LATENCY
    async with contextlib.AsyncExitStack() as stack:
        cluster = await stack.enter_async_context(
            running_replicas(work_dir, template, [SEED_WORKERS] * 3)
        )
        ingest, _ = await stack.enter_async_context(
            running_ingest(
                work_dir, port=ingest_port, analysis_address=f"127.0.0.1:{cluster.ports[0]}"
            )
        )
        completions = await stack.enter_async_context(Completions(cluster.stubs[0], images))
        await upload_all(ingest, distinct_images(images, label="scale seed"))
        times = await completions.wait(ideal * 3 + CALL_TIMEOUT)
    # The replicas write their calls when they stop.
    calls = sorted(
        moment
        for number in range(3)
        for moment in json.loads((work_dir / f"calls{number}.json").read_text())
    )
    most = max(
        sum(1 for later in calls[first:] if later < calls[first] + 1.0)
        for first in range(len(calls))
    )
    sustained = (images - 1) / (times[-1] - times[0])
    return SeedFigures(3, SEED_RATE, SEED_BURST, images, sustained, most, len(calls))
