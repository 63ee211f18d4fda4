"""WatchStatus fan-out: mediatag's analysis service against a bare grpc.aio broadcaster.

mediatag runs first: its queue is filled while paused, the watchers connect, and the queue
is resumed with no rate limit, so status changes come as fast as the workers go. The bare
server then broadcasts mediatag's own change messages to the same number of watchers at
the rate mediatag committed them, so both face the same load. Every server is a
subprocess: its RSS is its own, and the watchers in this process share no event loop with it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
from mediatag.analysis.v1 import analysis_pb2, analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from bench.bare_broadcast import BROADCAST_METHOD
from bench.benchmark import Benchmark, Figures, positive
from bench.fanout_report import (
    BARE,
    BARE_TIMED,
    OURS,
    Measured,
    ServerFigures,
    Setup,
    commit_offsets,
    fanout_figures,
    print_results,
    print_setup,
)
from bench.jpeg import photo_like_jpeg, with_comment
from bench.processes import PACKAGE_PARENT, cpu_seconds, free_ports, rss_bytes, running_server
from bench.watchers import WatcherPool, watching
from mediatag_common.grpc_server import channel_options

_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0
_CALL_TIMEOUT = 60.0
_OPEN_TIMEOUT = 60.0
# How long watchers get, after the window, to read every change committed in it.
_DRAIN_TIMEOUT = 60.0
_ENV_PREFIX = "MEDIATAG_"
_RATE_LIMIT = "local=100000:1000"
_IMAGE_SIZE = (320, 240)
_FILES_PER_UPLOAD = 32
# Warm-up before the idle RSS: a few streams and events, so first-use costs (imports,
# lazily built tables, the first streaming call) are not charged to the watchers.
_WARMUP_WATCHERS = 10
_WARMUP_JOBS = 20
_WARMUP_BROADCAST_SECONDS = 2.0
# RSS is sampled a few times after a pause and the median kept: it moves a little as
# garbage is collected and the allocator returns memory.
_RSS_SETTLE = 2.0
_RSS_SAMPLES = 5
_RSS_SAMPLE_PAUSE = 0.2
_POLL = 0.1
_PENDING = analysis_pb2.PROCESSING_STATUS_PENDING
_COMPLETED = analysis_pb2.PROCESSING_STATUS_COMPLETED


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--fanout-watchers", type=positive, default=1000, metavar="N",
        help="WatchStatus streams per server (default 1000)",
    )  # fmt: skip
    group.add_argument(
        "--fanout-channels", type=positive, default=10, metavar="N",
        help="client connections the streams are spread over (default 10)",
    )  # fmt: skip
    group.add_argument(
        "--fanout-seconds", type=positive, default=20, metavar="S",
        help="measured window per server (default 20)",
    )  # fmt: skip
    group.add_argument(
        "--fanout-warmup", type=positive, default=5, metavar="S",
        help="seconds of events before the window, and of the check of mediatag's jobs/s "
        "with no watchers (default 5)",
    )  # fmt: skip
    group.add_argument(
        "--fanout-jobs", type=positive, default=1500, metavar="N",
        help="images queued before the run; enough to keep the workers busy (default 1500)",
    )  # fmt: skip
    group.add_argument(
        "--fanout-workers", type=positive, default=4, metavar="N",
        help="mediatag analysis workers (default 4)",
    )  # fmt: skip
    group.add_argument(
        "--fanout-image-kb", type=positive, default=15, metavar="KB",
        help=f"approximate size of each {_IMAGE_SIZE[0]}x{_IMAGE_SIZE[1]} JPEG (default 15)",
    )  # fmt: skip


async def run(args: argparse.Namespace) -> Figures:
    """Measure mediatag, then bare at mediatag's rate; print set-up, table and targets."""
    width, height = _IMAGE_SIZE
    image = photo_like_jpeg(0, target_bytes=args.fanout_image_kb * 1000, width=width, height=height)
    setup = Setup(
        cores=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        grpcio=grpc.__version__,
        watchers=args.fanout_watchers,
        channels=args.fanout_channels,
        workers=args.fanout_workers,
        rate_limit=_RATE_LIMIT,
        # Room for ingest's own watcher and for warm-up streams still closing.
        max_watchers=args.fanout_watchers + 100,
        jobs=args.fanout_jobs,
        image_pixels=f"{width}x{height}",
        image_bytes=len(image.content),
        warmup_seconds=args.fanout_warmup,
        window_seconds=args.fanout_seconds,
        temp_dir=tempfile.gettempdir(),
    )
    print_setup(setup)
    with tempfile.TemporaryDirectory(prefix="mediatag-bench-") as work_dir:
        print(f"measuring {OURS} ...", flush=True)
        ours, samples, unwatched = await _measure_ours(Path(work_dir), setup, image.content)
        rate = ServerFigures.of(ours).changes_per_second
        print(f"measuring {BARE} at {rate:.1f} changes/s ...", flush=True)
        bare = await _measure_bare(Path(work_dir), setup, rate, samples)
        print(f"measuring {BARE_TIMED}: {BARE} at the moments {OURS} committed ...", flush=True)
        offsets = commit_offsets(ours.receipts)
        bare_timed = await _measure_bare(Path(work_dir), setup, rate, samples, offsets)
    figures = fanout_figures(
        setup, ours, bare, bare_timed, jobs_per_second_without_watchers=unwatched
    )
    print_results(figures)
    return dataclasses.asdict(figures)


async def _measure_ours(
    work_dir: Path, setup: Setup, image: bytes
) -> tuple[Measured, list[bytes], float]:
    """mediatag's run, change messages its first watcher read (for the bare server), and
    the workers' jobs per second with no watchers (but ingest's)."""
    analysis_port, ingest_port = free_ports(2)
    address = f"127.0.0.1:{analysis_port}"
    async with contextlib.AsyncExitStack() as stack:
        analysis = await stack.enter_async_context(
            _mediatag(work_dir, "analysis", analysis_port, ingest_port, setup)
        )
        ingest = await stack.enter_async_context(
            _mediatag(work_dir, "ingest", analysis_port, ingest_port, setup)
        )
        options = channel_options()
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(address, options=options)
        )
        ingest_channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{ingest_port}", options=options)
        )
        queue = analysis_pb2_grpc.AnalysisServiceStub(channel)
        await queue.PauseQueue(analysis_pb2.PauseQueueRequest(), timeout=_CALL_TIMEOUT)
        await upload_copies(ingest_pb2_grpc.IngestServiceStub(ingest_channel), image, setup.jobs)
        await until_status(queue, lambda status: count_of(status, _PENDING) >= setup.jobs)

        async with _watchers(address, _WARMUP_WATCHERS, setup):
            await _run_jobs(queue, _WARMUP_JOBS)
        unwatched = await _jobs_per_second(queue, setup.warmup_seconds)
        idle_rss = await steady_rss(analysis.pid)
        async with _watchers(address, setup.watchers, setup) as pool:
            watched_rss = await steady_rss(analysis.pid)
            pids = {"analysis": analysis.pid, "ingest": ingest.pid, "client": os.getpid()}
            await queue.ResumeQueue(analysis_pb2.ResumeQueueRequest(), timeout=_CALL_TIMEOUT)
            window_ns, cpu_cores = await _window(setup, pids)
            # Every change committed so far, the window's included, has a revision up to this.
            status = await queue.GetQueueStatus(
                analysis_pb2.GetQueueStatusRequest(), timeout=_CALL_TIMEOUT
            )
            caught_up = await _drain(pool, status.current_revision)
            await pause_and_settle(queue)
            if not count_of(status, _PENDING):
                print("  warning: the queue ran dry during the run; raise --fanout-jobs")
            ended, samples = dict(pool.ended), list(pool.samples)
    measured = Measured(
        pool.receipts, window_ns, idle_rss, watched_rss, setup.watchers,
        cpu_cores, ended, caught_up,
    )  # fmt: skip
    return measured, samples, unwatched


async def _measure_bare(
    work_dir: Path,
    setup: Setup,
    rate: float,
    samples: list[bytes],
    offsets: list[float] | None = None,
) -> Measured:
    """The bare broadcaster's run at ``rate`` broadcasts per second of ``samples``, evenly
    spaced or at ``offsets``."""
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "bench.bare_broadcast", "--port", str(port)]
    server = running_server(
        BARE, argv, address=address, log_path=work_dir / f"{BARE}.log",
        ready_timeout=_READY_TIMEOUT, stop_timeout=_STOP_TIMEOUT, cwd=PACKAGE_PARENT,
    )  # fmt: skip
    templates = [base64.b64encode(sample).decode() for sample in samples]
    async with server as process, grpc.aio.insecure_channel(address) as channel:
        control: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            BROADCAST_METHOD
        )

        async def broadcast(seconds: float) -> int:
            order: dict[str, object] = {"rate": rate, "seconds": seconds, "templates": templates}
            if offsets:
                order["offsets"] = offsets
            answer = await control(json.dumps(order).encode(), timeout=seconds + _CALL_TIMEOUT)
            return int(json.loads(answer)["last_revision"])

        async with _watchers(address, _WARMUP_WATCHERS, setup):
            await broadcast(_WARMUP_BROADCAST_SECONDS)
        idle_rss = await steady_rss(process.pid)
        async with _watchers(address, setup.watchers, setup) as pool:
            watched_rss = await steady_rss(process.pid)
            pids = {BARE: process.pid, "client": os.getpid()}
            sending = asyncio.create_task(broadcast(setup.warmup_seconds + setup.window_seconds))
            window_ns, cpu_cores = await _window(setup, pids)
            caught_up = await _drain(pool, await sending)
            ended = dict(pool.ended)
    return Measured(
        pool.receipts, window_ns, idle_rss, watched_rss, setup.watchers,
        cpu_cores, ended, caught_up,
    )  # fmt: skip


def _mediatag(
    work_dir: Path, service: str, analysis_port: int, ingest_port: int, setup: Setup
) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """``mediatag serve SERVICE`` as a user starts it, with the benchmark's settings."""
    mediatag = Path(sys.executable).parent / "mediatag"
    argv = [
        str(mediatag), "serve", service, "--data-dir", str(work_dir / OURS),
        "--analysis-port", str(analysis_port), "--ingest-port", str(ingest_port),
        "--log-level", "WARNING",
    ]  # fmt: skip
    if service == "analysis":
        argv += [
            "--workers", str(setup.workers), "--rate-limit", setup.rate_limit,
            "--max-watchers", str(setup.max_watchers),
            # Every watcher is this benchmark's, one caller: its share is all of them.
            "--max-watchers-per-caller", str(setup.max_watchers),
        ]  # fmt: skip
    port = analysis_port if service == "analysis" else ingest_port
    env = {key: value for key, value in os.environ.items() if not key.startswith(_ENV_PREFIX)}
    return running_server(
        f"{OURS} {service}", argv, address=f"127.0.0.1:{port}",
        log_path=work_dir / f"{OURS}-{service}.log", ready_timeout=_READY_TIMEOUT,
        stop_timeout=_STOP_TIMEOUT, env=env,
    )  # fmt: skip


def _watchers(
    address: str, count: int, setup: Setup
) -> contextlib.AbstractAsyncContextManager[WatcherPool]:
    channels = min(count, setup.channels)
    return watching(address, count=count, channels=channels, open_timeout=_OPEN_TIMEOUT)


async def upload_copies(
    ingest: ingest_pb2_grpc.IngestServiceAsyncStub, image: bytes, jobs: int
) -> None:
    """``jobs`` copies of ``image``, each with distinct bytes, so none is served from cache."""
    for first in range(0, jobs, _FILES_PER_UPLOAD):
        files = [
            ingest_pb2.MediaFile(
                filename=f"fanout-{number}.jpg",
                content_type="image/jpeg",
                content=with_comment(image, f"bench fanout {number}".encode()),
            )
            for number in range(first, min(first + _FILES_PER_UPLOAD, jobs))
        ]
        await ingest.UploadMedia(
            ingest_pb2.UploadMediaRequest(owner_id="bench-owner", category="Hair", files=files),
            timeout=_CALL_TIMEOUT,
        )


async def until_status(
    queue: analysis_pb2_grpc.AnalysisServiceAsyncStub,
    done: Callable[[analysis_pb2.GetQueueStatusResponse], bool],
) -> None:
    """Poll the queue's status until ``done`` says so."""
    async with asyncio.timeout(_CALL_TIMEOUT):
        while True:
            request = analysis_pb2.GetQueueStatusRequest()
            if done(await queue.GetQueueStatus(request, timeout=_CALL_TIMEOUT)):
                return
            await asyncio.sleep(_POLL)


def count_of(status: analysis_pb2.GetQueueStatusResponse, job_status: int) -> int:
    return sum(count.count for count in status.counts if count.status == job_status)


async def _run_jobs(queue: analysis_pb2_grpc.AnalysisServiceAsyncStub, jobs: int) -> None:
    """Let the workers complete about ``jobs`` jobs, then pause and wait for them to stop."""
    await queue.ResumeQueue(analysis_pb2.ResumeQueueRequest(), timeout=_CALL_TIMEOUT)
    await until_status(queue, lambda status: count_of(status, _COMPLETED) >= jobs)
    await pause_and_settle(queue)


async def pause_and_settle(queue: analysis_pb2_grpc.AnalysisServiceAsyncStub) -> None:
    """Pause the queue and wait for the jobs in flight to end (so none fails at shutdown)."""
    await queue.PauseQueue(analysis_pb2.PauseQueueRequest(), timeout=_CALL_TIMEOUT)
    await until_status(queue, lambda status: status.workers_busy == 0)


async def _jobs_per_second(
    queue: analysis_pb2_grpc.AnalysisServiceAsyncStub, seconds: float
) -> float:
    """Jobs completed per second over ``seconds``, after a second to get going; then pause."""
    await queue.ResumeQueue(analysis_pb2.ResumeQueueRequest(), timeout=_CALL_TIMEOUT)
    await asyncio.sleep(1.0)
    request = analysis_pb2.GetQueueStatusRequest()
    before = count_of(await queue.GetQueueStatus(request, timeout=_CALL_TIMEOUT), _COMPLETED)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after = count_of(await queue.GetQueueStatus(request, timeout=_CALL_TIMEOUT), _COMPLETED)
    elapsed = time.monotonic() - started
    await pause_and_settle(queue)
    return (after - before) / elapsed


async def _window(
    setup: Setup, pids: Mapping[str, int]
) -> tuple[tuple[int, int], dict[str, float]]:
    """Sleep through the warm-up and the window; the window (ns) and CPU cores used in it,
    by process and by process's main thread."""
    await asyncio.sleep(setup.warmup_seconds)
    start_ns = time.time_ns()
    before = _cpu(pids)
    await asyncio.sleep(setup.window_seconds)
    end_ns = time.time_ns()
    after = _cpu(pids)
    seconds = (end_ns - start_ns) / 1e9
    return (start_ns, end_ns), {role: (after[role] - before[role]) / seconds for role in after}


def _cpu(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process, and of its main thread (its event loop)."""
    used = {}
    for role, pid in pids.items():
        used[role] = cpu_seconds(pid)
        used[f"{role} loop"] = cpu_seconds(pid, main_thread=True)
    return used


async def _drain(pool: WatcherPool, revision: int) -> bool:
    """Wait until every open watcher has read ``revision``; False if they did not in time."""
    try:
        async with asyncio.timeout(_DRAIN_TIMEOUT):
            await pool.wait_for_revision(revision)
    except TimeoutError:
        return False
    return True


async def steady_rss(pid: int) -> int:
    await asyncio.sleep(_RSS_SETTLE)
    samples = []
    for _ in range(_RSS_SAMPLES):
        samples.append(rss_bytes(pid))
        await asyncio.sleep(_RSS_SAMPLE_PAUSE)
    return int(statistics.median(samples))


BENCHMARK = Benchmark(
    name="fanout",
    summary="WatchStatus to many watchers: mediatag analysis vs a bare grpc.aio broadcaster",
    add_arguments=add_arguments,
    run=run,
)
