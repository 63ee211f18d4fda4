"""Queue overhead: jobs/s through the whole pipeline, and through the JobQueue alone.

The analyser answers at once and no rate limit binds, so what is left is the cost of
moving a job through mediatag. The pipeline runs as separate processes with the images in
a real ingest service; the queue alone runs in this process. Each SQLite synchronous
setting gets new databases, and the two paths run back to back at each.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mediatag.analysis.v1 import analysis_pb2, analysis_pb2_grpc

from bench.benchmark import Benchmark, Figures, positive
from bench.load import split_evenly
from bench.pipeline import (
    CALL_TIMEOUT,
    Completions,
    distinct_images,
    job_spec,
    running_analysis,
    running_ingest,
    upload_all,
)
from bench.processes import cpu_seconds, free_ports
from bench.queue_alone import QueueAlone, QueueAloneRun, job_specs
from bench.queue_report import (
    PipelineMeasured,
    QueueFigures,
    SettingFigures,
    Setup,
    print_results,
    print_setup,
)
from bench.sim_server import SimServer
from ingest_service.config import IngestConfig
from mediatag_common.database import sqlite_url

_DIMENSIONS = 16
_UPLOAD_CONCURRENCY = 4
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
# A run slower than this many jobs/s is declared stuck.
_STUCK_BELOW = 5.0


def _settings(text: str) -> list[str]:
    settings = [item.strip().upper() for item in text.split(",")]
    if not settings or any(item not in _SYNCHRONOUS for item in settings):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(_SYNCHRONOUS)}")
    return settings


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--queue-jobs", type=positive, default=5000, metavar="N",
        help="jobs through each path (default 5000)",
    )  # fmt: skip
    group.add_argument(
        "--queue-workers", type=positive, default=4, metavar="N",
        help="analysis workers, and concurrent claiming tasks of the queue alone "
        "(default 4, the service's default)",
    )  # fmt: skip
    group.add_argument(
        "--queue-batch", type=positive, default=IngestConfig().outbox_batch_size, metavar="N",
        help="jobs per SubmitJobs call and per submit (default: ingest's outbox batch, "
        f"{IngestConfig().outbox_batch_size})",
    )  # fmt: skip
    group.add_argument(
        "--queue-synchronous", type=_settings, default=_settings("FULL"), metavar="MODE,...",
        help="SQLite synchronous settings to measure, e.g. FULL,NORMAL (default FULL, the "
        "service's default)",
    )  # fmt: skip
    group.add_argument(
        "--queue-rounds", type=positive, default=2, metavar="N",
        help="rounds the jobs are split into, alternating which path goes first (default 2)",
    )  # fmt: skip


async def run(args: argparse.Namespace) -> Figures:
    """Upload the images once; at each setting, both paths in alternating rounds."""
    images = distinct_images(args.queue_jobs, label="queue")
    setup = Setup(
        cores=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        jobs=args.queue_jobs,
        workers=args.queue_workers,
        submit_batch=args.queue_batch,
        image_bytes=len(images[0]),
        embedding_dimensions=_DIMENSIONS,
        synchronous=args.queue_synchronous,
        rounds=min(args.queue_rounds, args.queue_jobs),
    )
    print_setup(setup)
    settings = []
    with tempfile.TemporaryDirectory(prefix="mediatag-bench-") as work_dir:
        root = Path(work_dir)
        ingest_port, nowhere = free_ports(2)
        async with running_ingest(
            root, port=ingest_port, analysis_address=f"127.0.0.1:{nowhere}"
        ) as (ingest, ingest_process):
            print(f"uploading {setup.jobs} images to ingest ...", flush=True)
            started = time.perf_counter()
            media = await upload_all(ingest, images, concurrency=_UPLOAD_CONCURRENCY)
            upload_seconds = time.perf_counter() - started
            specs = [job_spec(item) for item in media]
            for synchronous in setup.synchronous:
                measured = await _measure_setting(
                    root / synchronous, setup, specs, synchronous,
                    ingest_port=ingest_port, ingest_pid=ingest_process.pid,
                )  # fmt: skip
                settings.append(measured)
    figures = QueueFigures(setup, upload_seconds, settings)
    print_results(figures)
    return dataclasses.asdict(figures)


async def _measure_setting(
    work_dir: Path,
    setup: Setup,
    specs: Sequence[analysis_pb2.JobSpec],
    synchronous: str,
    *,
    ingest_port: int,
    ingest_pid: int,
) -> SettingFigures:
    """A new analysis service and a new queue alone; both paths in alternating rounds."""
    (port,) = free_ports(1)
    sim = SimServer(
        port=port, data_dir=work_dir / "analysis", ingest_address=f"127.0.0.1:{ingest_port}",
        workers=setup.workers, latency=0.0, rate_per_second=None, burst=1,
        synchronous=synchronous, dimensions=_DIMENSIONS,
    )  # fmt: skip
    (work_dir / "alone").mkdir(parents=True)
    alone = QueueAlone(
        sqlite_url(str(work_dir / "alone" / "analysis.db")), synchronous=synchronous,
        batch=setup.submit_batch, tasks=setup.workers, dimensions=_DIMENSIONS,
    )  # fmt: skip
    pipeline_rounds: list[PipelineMeasured] = []
    alone_rounds: list[QueueAloneRun] = []
    async with contextlib.AsyncExitStack() as stack:
        analysis, process = await stack.enter_async_context(
            running_analysis(sim, work_dir / "analysis.log")
        )
        await stack.enter_async_context(alone)
        pids = {"analysis": process.pid, "ingest": ingest_pid, "client": os.getpid()}
        first = 0
        for number, count in enumerate(split_evenly(len(specs), setup.rounds)):
            pipeline_specs = specs[first : first + count]
            alone_specs = job_specs(first, count)
            first += count
            paths = ["pipeline", "queue alone"]
            for path in paths if number % 2 == 0 else paths[::-1]:
                print(
                    f"measuring synchronous={synchronous}, round {number + 1} of "
                    f"{setup.rounds}: {path} ...",
                    flush=True,
                )
                if path == "pipeline":
                    measured = await _pipeline_round(analysis, pipeline_specs, setup, pids)
                    pipeline_rounds.append(measured)
                else:
                    alone_rounds.append(await alone.run(alone_specs))
    return SettingFigures.of(synchronous, pipeline_rounds, alone_rounds)


async def _pipeline_round(
    analysis: analysis_pb2_grpc.AnalysisServiceAsyncStub,
    specs: Sequence[analysis_pb2.JobSpec],
    setup: Setup,
    pids: Mapping[str, int],
) -> PipelineMeasured:
    """Submit ``specs`` with SubmitJobs and wait until a watcher has read each COMPLETED."""
    async with Completions(analysis, len(specs)) as completions:
        cpu_before = _cpu(pids)
        started = time.perf_counter()
        for first in range(0, len(specs), setup.submit_batch):
            request = analysis_pb2.SubmitJobsRequest(jobs=specs[first : first + setup.submit_batch])
            await analysis.SubmitJobs(request, timeout=CALL_TIMEOUT)
        submitted = time.perf_counter()
        times = await completions.wait(len(specs) / _STUCK_BELOW)
        cpu_after = _cpu(pids)
    return PipelineMeasured(
        jobs=len(specs),
        seconds=times[-1] - started,
        submit_seconds=submitted - started,
        cpu_seconds={role: cpu_after[role] - cpu_before[role] for role in cpu_after},
    )


def _cpu(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process, and of the analysis service's event loop thread."""
    used = {role: cpu_seconds(pid) for role, pid in pids.items()}
    used["analysis loop"] = cpu_seconds(pids["analysis"], main_thread=True)
    return used


BENCHMARK = Benchmark(
    name="queue",
    summary="queue overhead: zero-latency analyser, no rate limit, whole pipeline vs JobQueue",
    add_arguments=add_arguments,
    run=run,
)
