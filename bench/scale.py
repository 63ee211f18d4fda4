"""Beyond one machine: the queue on SQLite and PostgreSQL beside Procrastinate, analysis
replicas on one PostgreSQL, one global rate limit, one ordered watch.

Everything in one run, side by side: the queue alone (in this process); the pipeline with
1, 2 and 3 analysis replicas on PostgreSQL and one on SQLite; the seed benchmark with three
replicas under one limit; how late a watcher on one replica reads a change committed on
another; and 1,000 watchers on a replica without workers beside the replica that works.
The analysis replicas are ``bench.sim_server`` processes (the real service, simulated
analyser); ingest is ``mediatag serve ingest`` holding the images. A part that cannot run
(e.g. a feature not there yet) prints why and the others go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
from pathlib import Path

from bench.benchmark import Benchmark, Figures, positive
from bench.pipeline import distinct_images, job_spec, running_ingest, upload_all
from bench.processes import free_ports
from bench.scale_cluster import postgres
from bench.scale_report import (
    ScaleFigures,
    print_apart,
    print_delays,
    print_rows,
    print_seed,
    print_targets,
    targets,
)
from bench.scale_runs import (
    APART_WARM_UP,
    BATCH,
    DELAY_RATE,
    SEED_BURST,
    SEED_LATENCY,
    SEED_RATE,
    SEED_WORKERS,
    SYNCHRONOUS,
    WORKERS,
    ReplicaRuns,
    part,
    queue_rows,
    seed,
)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--scale-database-url", metavar="URL",
        help="a PostgreSQL user that may create databases, postgresql://USER@HOST:PORT/DB "
        "(default: a throwaway server, as the tests start)",
    )  # fmt: skip
    group.add_argument(
        "--scale-queue-jobs", type=positive, default=10_000, metavar="N",
        help="jobs through the queue alone and through Procrastinate (default 10000)",
    )  # fmt: skip
    group.add_argument(
        "--scale-rounds", type=positive, default=3, metavar="N",
        help="rounds of the queue alone, Procrastinate, the pipelines and the watchers apart; "
        "each one's median is shown (default 3)",
    )  # fmt: skip
    group.add_argument(
        "--scale-pipeline-jobs", type=positive, default=2000, metavar="N",
        help="jobs through the pipeline per configuration, and per watcher phase (default 2000)",
    )  # fmt: skip
    group.add_argument(
        "--scale-seed-images", type=positive, default=200, metavar="N",
        help="images through the seed run with three replicas (default 200)",
    )  # fmt: skip
    group.add_argument(
        "--scale-watchers", type=positive, default=1000, metavar="N",
        help="watchers on the replica without workers (default 1000)",
    )  # fmt: skip


async def run(args: argparse.Namespace) -> Figures:
    cores = os.cpu_count() or 1
    with (
        postgres(args.scale_database_url) as pg,
        tempfile.TemporaryDirectory(prefix="mediatag-bench-") as work,
    ):
        setup = {
            "cores": cores,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "postgresql": pg.server.version,
            "sqlite_synchronous": SYNCHRONOUS,
            "workers_per_replica": WORKERS,
        }
        figures = ScaleFigures(setup)
        _print_setup(args, setup)
        root = Path(work)
        figures.queue = await queue_rows(root, pg, args.scale_queue_jobs, args.scale_rounds)
        print_rows("queue alone", figures.queue, figures.queue[-1])
        images = distinct_images(args.scale_pipeline_jobs, label="scale")
        ingest_port, nowhere = free_ports(2)
        async with running_ingest(
            root, port=ingest_port, analysis_address=f"127.0.0.1:{nowhere}"
        ) as (ingest, ingest_process):
            print(f"\nuploading {len(images)} images to ingest (not timed) ...", flush=True)
            specs = [job_spec(media) for media in await upload_all(ingest, images, concurrency=4)]
            bench = ReplicaRuns(root, pg, f"127.0.0.1:{ingest_port}", ingest_process.pid)
            figures.pipeline = await bench.pipeline_rows(specs, args.scale_rounds)
            print_rows("pipeline", figures.pipeline, figures.pipeline[1])
            figures.delays = await part(bench.watch_delays(specs))
            print_delays(figures.delays)
            figures.apart = await part(
                bench.watchers_apart(specs, args.scale_watchers, cores, args.scale_rounds)
            )
            print_apart(figures.apart)
        figures.seed = await part(seed(root, pg, args.scale_seed_images))
        print_seed(figures.seed)
    figures.targets = targets(figures)
    print_targets(figures.targets)
    return dataclasses.asdict(figures)


def _print_setup(args: argparse.Namespace, setup: dict[str, object]) -> None:
    lines = [
        "scale benchmark: one PostgreSQL, several analysis replicas, one limit, one watch",
        f"  machine   {setup['cores']} cores, {setup['platform']}, python {setup['python']}; "
        f"PostgreSQL {setup['postgresql']} (fsync on)",
        f"  rounds    {args.scale_rounds}: each row of the queue, the pipeline and the "
        "watchers apart is the median of one run per round",
        f"  queue     {args.scale_queue_jobs} jobs: the JobQueue alone in this process (submit "
        f"in batches of {BATCH}, {WORKERS} tasks claim -> complete),",
        f"            on SQLite synchronous={SYNCHRONOUS} and on PostgreSQL; Procrastinate: one "
        f"batch deferred, a worker of concurrency {WORKERS}",
        f"  pipeline  {args.scale_pipeline_jobs} jobs per configuration: 2 KB JPEGs in "
        "`mediatag serve ingest` beforehand, SubmitJobs to replica 1,",
        f"            analysis replicas (bench.sim_server, {WORKERS} workers, zero-latency "
        "analyser, no limit) on a new database each;",
        "            timed to the last COMPLETED read by a watcher on replica 1",
        f"  seed      3 replicas x {SEED_WORKERS} workers, {SEED_LATENCY:g} s per call, one "
        f"limit of {SEED_RATE:g}/s burst {SEED_BURST}, {args.scale_seed_images} images "
        "through UploadMedia",
        f"  delay     changes at about {DELAY_RATE:g}/s committed by the replica with workers; "
        "a watcher on a replica without workers beside one on it",
        f"  apart     {args.scale_watchers} watchers (a process of their own) on a replica with "
        "--workers 0; the other replica's workers",
        f"            with and without them, in turns, after {APART_WARM_UP} jobs of warm-up",
        "  the machine is shared: other work on it shows in every figure",
    ]
    print("\n".join(lines), flush=True)


BENCHMARK = Benchmark(
    name="scale",
    summary="the queue on SQLite and PostgreSQL vs Procrastinate; analysis replicas on one "
    "PostgreSQL: pipeline, one global limit, cross-replica watch, watchers apart",
    add_arguments=add_arguments,
    run=run,
)
