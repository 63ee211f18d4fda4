"""The seed's design against mediatag, both calling one simulated analysis API.

The API takes a fixed latency per call and allows a fixed rate. mediatag runs as separate
processes (ingest, and the analysis service with the simulated analyser) and the images go
through the whole pipeline from UploadMedia; the seed runs as an in-memory model in this
process, on fewer images, since its sequential worker would take minutes on all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

from bench.benchmark import Benchmark, Figures, positive, positive_float
from bench.pipeline import (
    Completions,
    distinct_images,
    running_analysis,
    running_ingest,
    upload_all,
)
from bench.processes import free_ports
from bench.seed_model import BucketLimiter, run_seed_model
from bench.seed_report import OursMeasured, Setup, print_results, print_setup, seed_figures
from bench.sim_server import SimServer
from bench.simulated import SimulatedAnalyzer

_BURST = 1
_SYNCHRONOUS = "FULL"
# Slack on top of the ideal time before a run is declared stuck.
_STUCK_AFTER = 60.0


def _at_least_two(text: str) -> int:
    value = positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError("needs at least 2 images to time a rate")
    return value


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--seed-latency", type=positive_float, default=1.0, metavar="S",
        help="seconds per simulated API call (default 1)",
    )  # fmt: skip
    group.add_argument(
        "--seed-rate", type=positive_float, default=10.0, metavar="R",
        help="the simulated API's limit, calls per second (default 10)",
    )  # fmt: skip
    group.add_argument(
        "--seed-images", type=_at_least_two, default=200, metavar="N",
        help="images through mediatag; the seed's time for them is worked out (default 200)",
    )  # fmt: skip
    group.add_argument(
        "--seed-model-images", type=_at_least_two, default=20, metavar="N",
        help="images through the seed model, which is timed for real (default 20)",
    )  # fmt: skip
    group.add_argument(
        "--seed-workers", type=positive, default=16, metavar="N",
        help="mediatag analysis workers; at least latency x rate keep the limit busy "
        "(default 16)",
    )  # fmt: skip


async def run(args: argparse.Namespace) -> Figures:
    """Run mediatag, then the seed model; print set-up, table and target."""
    images = distinct_images(args.seed_images, label="seed")
    setup = Setup(
        cores=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        latency_seconds=args.seed_latency,
        rate_limit_per_second=args.seed_rate,
        burst=_BURST,
        images=args.seed_images,
        seed_model_images=args.seed_model_images,
        workers=args.seed_workers,
        image_bytes=len(images[0]),
        sqlite_synchronous=_SYNCHRONOUS,
    )
    print_setup(setup)
    print(f"measuring {setup.images} images through mediatag ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="mediatag-bench-") as work_dir:
        ours = await _measure_ours(Path(work_dir), setup, images)
    print(f"measuring {setup.seed_model_images} images through the seed model ...", flush=True)
    seed_run = await run_seed_model(_analyzer(setup), _limiter(setup), setup.seed_model_images)
    figures = seed_figures(setup, seed_run, ours)
    print_results(figures)
    return dataclasses.asdict(figures)


def _analyzer(setup: Setup) -> SimulatedAnalyzer:
    return SimulatedAnalyzer(
        latency=setup.latency_seconds, rate_per_second=setup.rate_limit_per_second, burst=_BURST
    )


def _limiter(setup: Setup) -> BucketLimiter:
    return BucketLimiter(setup.rate_limit_per_second, _BURST)


async def _measure_ours(work_dir: Path, setup: Setup, images: list[bytes]) -> OursMeasured:
    """Upload every image, then wait for every COMPLETED; times from the first upload."""
    ingest_port, analysis_port = free_ports(2)
    sim = SimServer(
        port=analysis_port,
        data_dir=work_dir / "analysis",
        ingest_address=f"127.0.0.1:{ingest_port}",
        workers=setup.workers,
        latency=setup.latency_seconds,
        rate_per_second=setup.rate_limit_per_second,
        burst=_BURST,
        synchronous=setup.sqlite_synchronous,
    )
    ideal = (setup.images - 1) / setup.rate_limit_per_second + setup.latency_seconds
    async with contextlib.AsyncExitStack() as stack:
        analysis, _ = await stack.enter_async_context(
            running_analysis(sim, work_dir / "analysis.log")
        )
        ingest, _ = await stack.enter_async_context(
            running_ingest(
                work_dir,
                port=ingest_port,
                analysis_address=f"127.0.0.1:{analysis_port}",
                synchronous=setup.sqlite_synchronous,
            )
        )
        completions = await stack.enter_async_context(Completions(analysis, len(images)))
        started = time.perf_counter()
        await upload_all(ingest, images)
        uploaded = time.perf_counter()
        times = await completions.wait(ideal * 3 + _STUCK_AFTER)
    return OursMeasured(
        upload_seconds=uploaded - started,
        first_completed_seconds=times[0] - started,
        last_completed_seconds=times[-1] - started,
    )


BENCHMARK = Benchmark(
    name="seed",
    summary="the seed's sequential worker vs mediatag's worker pool, one simulated API",
    add_arguments=add_arguments,
    run=run,
)
